"""processors.shared.mp3 (frames checked, joined, counted) and the Polly text chunks and voices."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from processors.shared import mp3
from processors.shared.polly import MAX_CHUNK_CHARS, Synthesizer, Voice, split_text, voice_for

FRAME = mp3.silent_frames(1)  # 96 bytes: MPEG-2 Layer III, 24 kHz, 32 kbit/s, mono


def id3v2(size: int = 20) -> bytes:
    syncsafe = bytes((size >> s) & 0x7F for s in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + syncsafe + b"T" * size


def info_frame() -> bytes:
    """A LAME-style Info frame: the first frame, "Info" right after the side information."""
    frame = bytearray(FRAME)
    frame[4 + 9 : 4 + 13] = b"Info"
    return bytes(frame)


def test_a_stream_of_frames_and_its_duration() -> None:
    stream = mp3.parse(mp3.silent_frames(250))
    assert len(FRAME) == 96 and stream.frame_count == 250
    assert stream.header is not None and stream.header.describe() == "MPEG-2 Layer 3, 24000 Hz mono"
    assert stream.duration_s == pytest.approx(6.0)  # 250 × 576 samples / 24 kHz


def test_join_drops_tags_and_info_frames_and_adds_up_the_frames() -> None:
    first = id3v2() + info_frame() + mp3.silent_frames(10) + b"TAG" + bytes(125)
    second = info_frame() + mp3.silent_frames(5)
    joined = mp3.join([first, second])
    assert joined.frame_count == 15 and joined.frames == mp3.silent_frames(15)
    assert joined.duration_s == pytest.approx(15 * 0.024)
    assert mp3.parse(joined.frames).frame_count == 15  # the result is clean MP3 itself


def test_mpeg1_frames_count_1152_samples() -> None:
    stream = mp3.parse(mp3.silent_frames(100, sample_rate=44100, bitrate_kbps=128))
    assert stream.header is not None and stream.header.samples == 1152
    assert stream.duration_s == pytest.approx(100 * 1152 / 44100)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"<Error>AccessDenied</Error>", "no MP3 frame header at byte 0"),
        (mp3.silent_frames(3) + b"junk", "no MP3 frame header at byte 288"),
        (mp3.silent_frames(2)[:-10], "the frame at byte 96 needs 96 bytes, 86 are left"),
        (FRAME + mp3.silent_frames(1, sample_rate=22050), "is MPEG-2 Layer 3, 22050 Hz"),
    ],
)
def test_what_is_not_clean_mp3_is_refused_saying_where(data: bytes, problem: str) -> None:
    with pytest.raises(mp3.InvalidMp3, match=problem):
        mp3.parse(data)


def test_pieces_of_different_kinds_are_not_joined() -> None:
    with pytest.raises(mp3.InvalidMp3, match="the pieces differ"):
        mp3.join([FRAME, mp3.silent_frames(1, sample_rate=16000)])
    with pytest.raises(mp3.InvalidMp3, match="piece 2: no MP3 frame header"):
        mp3.join([FRAME, b"nope"])


def test_chunks_are_whole_sentences_within_the_limit() -> None:
    text = " ".join(f"Sentence {i}: short and sweet!" for i in range(400))
    chunks = split_text(text)
    assert all(len(c) <= MAX_CHUNK_CHARS for c in chunks) and len(chunks) == 5
    assert " ".join(chunks) == text and all(c.endswith("!") for c in chunks)
    assert split_text("One.\nTwo\n\n  Three?  ", 6) == ["One.", "Two", "Three?"]
    assert split_text("  \n ") == []


def test_a_sentence_longer_than_a_chunk_is_cut_at_clauses_then_spaces() -> None:
    clause = "a clause that goes on, "
    chunks = split_text(clause * 10 + "end.", 60)
    assert all(len(c) <= 60 for c in chunks) and all(c.endswith(",") for c in chunks[:-1])
    assert split_text("x" * 130, 60) == ["x" * 60, "x" * 60, "x" * 10]


@pytest.mark.parametrize(
    ("language", "voice", "engine", "known"),
    [
        (None, "Joanna", "neural", True),
        ("English", "Joanna", "neural", True),
        ("en-GB", "Amy", "neural", True),
        ("spanish", "Lucia", "neural", True),
        ("es_MX", "Mia", "neural", True),
        ("Russian", "Tatyana", "standard", True),  # no neural Russian voice
        ("Klingon", "Joanna", "neural", False),
    ],
)
def test_voice_by_language(language: str | None, voice: str, engine: str, known: bool) -> None:
    chosen, found = voice_for(language)
    assert (chosen.voice_id, chosen.engine, found) == (voice, engine, known)


async def test_the_chunks_are_joined_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real_join = mp3.join

    def join(pieces: list[bytes]) -> mp3.Mp3Stream:
        threads.append(threading.current_thread())
        return real_join(pieces)

    async def synthesize(self: Synthesizer, text: str, voice: Voice, ctx: Any) -> tuple[bytes, int]:
        return mp3.silent_frames(len(text)), len(text)

    monkeypatch.setattr(mp3, "join", join)
    monkeypatch.setattr(Synthesizer, "_synthesize", synthesize)
    ctx = SimpleNamespace(provider_usage=lambda provider, unit, amount: 0.0)
    voice, _ = voice_for("English")
    spoken = await Synthesizer(None, None).speak("Hello there.", voice, ctx)  # type: ignore[arg-type]
    assert spoken.duration_s == pytest.approx(12 * 0.024)
    assert threads and threads[0] is not threading.main_thread()
