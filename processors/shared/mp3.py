"""MP3 streams as frames: check them, join several into one, and measure the duration.

Polly answers each chunk of text with its own MP3 stream. Byte-wise concatenation is how
MP3 streams are joined (the format has no container: a stream is a run of self-describing
frames), but only if every piece is a clean run of frames of one kind. So each piece is
parsed here: an ID3v2 tag in front and an ID3v1 tag at the end are dropped, as is a
Xing/Info/VBRI frame (an encoder's header frame that holds the frame count of *its* piece:
left in the middle of a joined stream it would be played as a glitch and make players
believe the whole file is as long as that piece). Every other byte must belong to a frame
with a valid header, and all frames must share the MPEG version, layer, sample rate and
channel count, or `InvalidMp3` says where the stream breaks.

The duration is counted, not estimated: samples per frame / sample rate, summed over every
frame. (mutagen was considered: it reads the duration from the first frame's Xing header,
which after a join describes the first piece only; its estimate without one assumes a
constant bitrate. Counting the frames is exact and needs no dependency.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Bitrates in kbit/s by (MPEG-1?, layer) and the header's 4-bit index (0 = free, 15 = bad).
_BITRATES: dict[tuple[bool, int], tuple[int, ...]] = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Sample rates by the header's 2-bit version field (0: MPEG-2.5, 2: MPEG-2, 3: MPEG-1).
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_VERSION_NAMES = {3: "MPEG-1", 2: "MPEG-2", 0: "MPEG-2.5"}


class InvalidMp3(ValueError):
    """Bytes that are not a clean MP3 stream; the message says where and why."""


@dataclass(frozen=True)
class FrameHeader:
    version: int  # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    layer: int  # 1, 2 or 3
    bitrate_kbps: int
    sample_rate: int
    padding: bool
    channels: int
    has_crc: bool

    @property
    def samples(self) -> int:
        if self.layer == 1:
            return 384
        return 1152 if self.layer == 2 or self.version == 3 else 576

    @property
    def length(self) -> int:
        """Bytes in the frame, header included."""
        if self.layer == 1:
            return (12 * self.bitrate_kbps * 1000 // self.sample_rate + self.padding) * 4
        per_slot = 144 if self.samples == 1152 else 72
        return per_slot * self.bitrate_kbps * 1000 // self.sample_rate + self.padding

    @property
    def kind(self) -> tuple[int, int, int, int]:
        """What every frame of one stream must share."""
        return self.version, self.layer, self.sample_rate, self.channels

    def describe(self) -> str:
        mode = "mono" if self.channels == 1 else "stereo"
        return f"{_VERSION_NAMES[self.version]} Layer {self.layer}, {self.sample_rate} Hz {mode}"


def parse_header(data: bytes | memoryview, at: int) -> FrameHeader | None:
    """The frame header at `at`, or None when those 4 bytes are not a valid one."""
    if at + 4 > len(data):
        return None
    b1, b2, b3, b4 = data[at], data[at + 1], data[at + 2], data[at + 3]
    if b1 != 0xFF or (b2 & 0xE0) != 0xE0:
        return None
    version = (b2 >> 3) & 0b11
    layer_bits = (b2 >> 1) & 0b11
    bitrate_index = b3 >> 4
    rate_index = (b3 >> 2) & 0b11
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved version or layer, free-format or bad bitrate, reserved rate
    layer = 4 - layer_bits
    mpeg1 = version == 3
    return FrameHeader(
        version=version,
        layer=layer,
        bitrate_kbps=_BITRATES[(mpeg1, layer)][bitrate_index],
        sample_rate=_SAMPLE_RATES[version][rate_index],
        padding=bool(b3 & 0b10),
        channels=1 if (b4 >> 6) == 0b11 else 2,
        has_crc=not (b2 & 1),
    )


@dataclass(frozen=True)
class Mp3Stream:
    """The audio frames of one stream (tags and header frames removed) and what they hold."""

    frames: bytes
    frame_count: int
    samples: int
    header: FrameHeader | None  # the first frame's (None: no frames)

    @property
    def duration_s(self) -> float:
        return self.samples / self.header.sample_rate if self.header else 0.0


def parse(data: bytes) -> Mp3Stream:
    """Check `data` frame by frame; InvalidMp3 names the offset where it stops being MP3."""
    view = memoryview(data)
    start, end = _skip_id3v2(view), len(view)
    if end - start >= 128 and bytes(view[end - 128 : end - 125]) == b"TAG":
        end -= 128  # ID3v1 at the very end
    kept: list[memoryview] = []
    first: FrameHeader | None = None
    count = samples = 0
    at = start
    while at < end:
        header = parse_header(view, at)
        if header is None:
            raise InvalidMp3(f"no MP3 frame header at byte {at} of {len(data)}")
        stop = at + header.length
        if stop > end:
            raise InvalidMp3(
                f"the frame at byte {at} needs {header.length} bytes, {end - at} are left"
            )
        if first is None:
            first = header
        elif header.kind != first.kind:
            raise InvalidMp3(
                f"the frame at byte {at} is {header.describe()}, the stream {first.describe()}"
            )
        if not (count == 0 and _is_info_frame(view[at:stop], header)):
            kept.append(view[at:stop])
            count += 1
            samples += header.samples
        at = stop
    return Mp3Stream(b"".join(kept), count, samples, first if count else None)


def join(pieces: Iterable[bytes]) -> Mp3Stream:
    """One stream of every piece's frames, in order; InvalidMp3 when a piece is not clean MP3
    or the pieces differ in version, layer, sample rate or channels."""
    parsed = list(_parse_each(pieces))
    kinds = {p.header.kind: p.header for p in parsed if p.header is not None}
    if len(kinds) > 1:
        raise InvalidMp3("the pieces differ: " + "; ".join(h.describe() for h in kinds.values()))
    return Mp3Stream(
        b"".join(p.frames for p in parsed),
        sum(p.frame_count for p in parsed),
        sum(p.samples for p in parsed),
        next(iter(kinds.values()), None),
    )


def _parse_each(pieces: Iterable[bytes]) -> Iterator[Mp3Stream]:
    for i, piece in enumerate(pieces):
        try:
            yield parse(piece)
        except InvalidMp3 as exc:
            raise InvalidMp3(f"piece {i + 1}: {exc}") from None


def _skip_id3v2(view: memoryview) -> int:
    """Bytes taken by ID3v2 tags at the start (their sizes are syncsafe integers)."""
    at = 0
    while len(view) - at >= 10 and bytes(view[at : at + 3]) == b"ID3":
        size = 0
        for byte in view[at + 6 : at + 10]:
            size = (size << 7) | (byte & 0x7F)
        footer = 10 if view[at + 5] & 0x10 else 0
        at += 10 + size + footer
    return min(at, len(view))


def _is_info_frame(frame: memoryview, header: FrameHeader) -> bool:
    """An encoder's Xing/Info (after the side information) or VBRI (at 36) header frame."""
    if header.layer != 3:
        return False
    mono = header.channels == 1
    side_info = (17 if mono else 32) if header.version == 3 else (9 if mono else 17)
    at = 4 + (2 if header.has_crc else 0) + side_info
    return bytes(frame[at : at + 4]) in (b"Xing", b"Info") or bytes(frame[36:40]) == b"VBRI"


def silent_frames(count: int, *, sample_rate: int = 24000, bitrate_kbps: int = 32) -> bytes:
    """`count` silent MPEG-2 Layer III mono frames (all-zero side information: no audio data).

    What the Polly stand-in answers with, and what tests build streams from."""
    version = 2 if sample_rate in _SAMPLE_RATES[2] else 3
    rate_index = _SAMPLE_RATES[version].index(sample_rate)
    bitrate_index = _BITRATES[(version == 3, 3)].index(bitrate_kbps)
    header = bytes(
        (
            0xFF,
            0xE0 | (version << 3) | (0b01 << 1) | 1,  # Layer III, no CRC
            (bitrate_index << 4) | (rate_index << 2),
            0b11 << 6,  # mono
        )
    )
    parsed = parse_header(header, 0)
    assert parsed is not None
    return (header + bytes(parsed.length - 4)) * count
