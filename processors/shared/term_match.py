"""Does a study term occur in a text? Matching that ignores case, accents and inflection.

Used by the lesson checks: a keyword must occur in its document, a vocabulary entry must be
one of the terms asked for, a conversation is measured by the lesson terms it uses.

The rules, kept small so that a surprise can be explained:

- Case and accents: both sides are case-folded and decomposed (NFKD), and combining marks
  are dropped, so `Corazón` matches `corazon` and `Straße` matches `strasse`.
- Words: runs of letters and digits (`\\w+`); punctuation and hyphens separate words, so
  `heart-rate` matches `heart rate` and `patient's` contains `patient`.
- Base forms: two words match when they are equal once at most one inflectional ending is
  taken off either of them (ENDINGS: plural, past and -ing endings of English, the -s/-es
  plurals of Spanish, Portuguese and French, German -e/-en/-er), as long as at least
  MIN_STEM letters remain. `study` ~ `studies`, `measure` ~ `measured`, `run` ~ `running`,
  `enfermedad` ~ `enfermedades`, `luz` ~ `luces`. Derivations do not match (`cardiology` is
  not `cardiologist`), nor do irregular forms (`mouse`, `mice`). The rules lean towards a
  match: a check built on them drops what is plainly absent, not what is merely spelt
  differently.
- A term of several words matches the same number of consecutive words, each matching.
- Scripts written without spaces (Chinese, Japanese, Thai, ...) have no word boundaries to
  go by: a term with such characters matches as a substring of the folded text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

MIN_STEM = 3
# (ending, what replaces it); one is taken off at most. Longer endings need no priority:
# every applicable one is tried, and words match when any of their forms meet.
ENDINGS = (
    ("s", ""), ("es", ""), ("ies", "y"), ("ces", "z"),  # plurals (en, es, pt, fr)
    ("ed", ""), ("d", ""), ("ied", "y"), ("ing", ""), ("ing", "e"),  # English verb forms
    ("e", ""), ("en", ""), ("er", ""),  # German plurals; a silent English -e
)  # fmt: skip
_WORD = re.compile(r"\w+")
_SPACELESS = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff]"
)


def fold(text: str) -> str:
    """Case-folded, without accents (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str) -> list[str]:
    return _WORD.findall(fold(text))


@lru_cache(maxsize=8192)
def base_forms(word: str) -> frozenset[str]:
    """The word and what it becomes with one ending taken off (or swapped, `ies` → `y`)."""
    forms = {word}
    for ending, replacement in ENDINGS:
        stem = word[: len(word) - len(ending)]
        if word.endswith(ending) and len(stem + replacement) >= MIN_STEM:
            forms.add(stem + replacement)
            if ending in ("ing", "ed") and len(stem) > MIN_STEM and stem[-1] == stem[-2]:
                forms.add(stem[:-1])  # running → run, stopped → stop
    return frozenset(forms)


def words_match(a: str, b: str) -> bool:
    """Two folded words: equal, or equal once an inflectional ending is off either."""
    return a == b or not base_forms(a).isdisjoint(base_forms(b))


def same_term(a: str, b: str) -> bool:
    """`a` and `b` are the same term, up to case, accents, punctuation and inflection."""
    wa, wb = words(a), words(b)
    if _SPACELESS.search(a) or _SPACELESS.search(b):
        return "".join(wa) == "".join(wb)
    return bool(wa) and len(wa) == len(wb) and all(map(words_match, wa, wb))


class TermIndex:
    """A text, folded and split into words once, to look many terms up in."""

    def __init__(self, text: str) -> None:
        self.folded = fold(text)
        self.words = _WORD.findall(self.folded)
        self._squeezed = "".join(self.folded.split())
        # Every base form of every word → where it stands, so a term's first word is found
        # without scanning the text.
        self._at: dict[str, list[int]] = {}
        for i, word in enumerate(self.words):
            for form in base_forms(word):
                self._at.setdefault(form, []).append(i)

    def __contains__(self, term: object) -> bool:
        if not isinstance(term, str):
            return False
        if _SPACELESS.search(term):
            squeezed = "".join(fold(term).split())
            return bool(squeezed) and squeezed in self._squeezed
        wanted = words(term)
        if not wanted:
            return False
        starts = sorted({i for form in base_forms(wanted[0]) for i in self._at.get(form, ())})
        n = len(wanted)
        return any(
            i + n <= len(self.words)
            and all(words_match(w, self.words[i + k]) for k, w in enumerate(wanted[1:], 1))
            for i in starts
        )

    def missing(self, terms: Iterable[str]) -> list[str]:
        """The terms that do not occur, in their order."""
        return [term for term in terms if term not in self]
