"""processors.shared.term_match: the matching rules the lesson checks are built on."""

from __future__ import annotations

import pytest

from processors.shared.term_match import TermIndex, base_forms, fold, same_term

TEXT = (
    "Cardiology studies the Heart-rate; ECGs show arrhythmias. Patients were running and "
    "stopped. Las enfermedades del CORAZÓN y las luces. Die Straße. 心臓の病気"
)


@pytest.mark.parametrize(
    "term",
    ["study", "heart rate", "ECG", "Arrhythmia", "patient", "run", "stop", "enfermedad",
     "corazon", "luz", "strasse", "心臓", "the heart"],
)  # fmt: skip
def test_terms_found_whatever_their_case_accents_or_inflection(term: str) -> None:
    assert term in TermIndex(TEXT)


@pytest.mark.parametrize(
    "term",
    ["cardiologist", "rate heart", "heart attack", "valve", "art", "stud", "病院", "", "  ", "s"],
)  # fmt: skip
def test_terms_not_found(term: str) -> None:
    assert term not in TermIndex(TEXT)


def test_short_words_keep_their_endings() -> None:
    # At least three letters must remain, so "us" is not a form of "uses" nor "bu" of "bus".
    assert base_forms("uses") == {"uses", "use"}
    assert "bu" not in base_forms("bus")
    assert fold("Ñandú Œuvre") == "nandu œuvre"


def test_same_term_needs_every_word_in_order() -> None:
    assert same_term("Heart Rates", "heart rate")
    assert same_term("análisis de sangre", "ANALISIS DE SANGRE")
    assert not same_term("heart", "heart rate")
    assert not same_term("rate heart", "heart rate")
    assert not same_term("", "")
    assert TermIndex(TEXT).missing(["heart", "valve", "ECG"]) == ["valve"]
