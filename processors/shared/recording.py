"""Recorded audio made ready for Azure Speech's short-audio REST API, in pure Python.

Azure's short-audio endpoint takes two formats only: WAV PCM 16 kHz 16-bit mono
(`audio/wav; codecs=audio/pcm; samplerate=16000`) and Ogg Opus (`audio/ogg; codecs=opus`).

    WAV PCM 16 kHz 16-bit mono       sent as it is
    WAV PCM, other rate / channels / width (8, 16, 24, 32-bit integer, 32-bit float)
                                     converted here: channels averaged, a moving-average
                                     low-pass when downsampling, linear interpolation to
                                     16 kHz, 16-bit (enough for scoring speech, not hi-fi)
    Ogg Opus, mono                   sent as it is (duration from the last page's granule)
    anything else (MP3, M4A/AAC, WebM, FLAC, Ogg Vorbis, stereo Opus, compressed WAV, ...)
                                     UnsupportedAudio naming the format and the accepted ones

No ffmpeg: the image stays small and the worker never hands untrusted media to a decoder;
conversion is CPU work, so callers run `prepare` in a thread. Every refusal is an
UnsupportedAudio (a PermanentJobError): the same bytes will never become acceptable.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate

from worker.errors import PermanentJobError

TARGET_RATE = 16000
WAV_CONTENT_TYPE = "audio/wav; codecs=audio/pcm; samplerate=16000"
OGG_OPUS_CONTENT_TYPE = "audio/ogg; codecs=opus"
ACCEPTED = (
    "WAV PCM (any sample rate and channel count, 8/16/24/32-bit; converted to 16 kHz 16-bit "
    "mono here) or Ogg Opus (mono)"
)
OPUS_GRANULE_RATE = 48000  # Opus granule positions count 48 kHz samples, whatever the input
_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_WAV_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "µ-law", 0x0011: "IMA ADPCM",
                     0x0055: "MP3"}  # fmt: skip


class UnsupportedAudio(PermanentJobError):
    """The recording cannot be assessed as it is; the message says why and what is accepted."""


@dataclass(frozen=True)
class PreparedAudio:
    body: bytes  # what is POSTed
    content_type: str
    seconds: float  # duration of `body`
    source: str  # what came in, e.g. "WAV PCM 44100 Hz stereo 16-bit" or "Ogg Opus"
    converted: bool


@dataclass(frozen=True)
class WavFormat:
    tag: int  # _PCM or _FLOAT after resolving WAVE_FORMAT_EXTENSIBLE
    channels: int
    rate: int
    bits: int

    def describe(self) -> str:
        layout = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels} channels")
        kind = "float" if self.tag == _FLOAT else "PCM"
        return f"WAV {kind} {self.rate} Hz {layout} {self.bits}-bit"


def prepare(data: bytes, max_seconds: float) -> PreparedAudio:
    """`data` as Azure takes it, or UnsupportedAudio (unknown format, empty, too long)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _prepare_wav(data, max_seconds)
    if data[:4] == b"OggS":
        return _prepare_ogg(data, max_seconds)
    raise UnsupportedAudio(f"Unsupported audio format: {sniff(data)}. Accepted: {ACCEPTED}")


def sniff(data: bytes) -> str:
    """A name for what `data` looks like, for the refusal."""
    if not data:
        return "an empty file"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "MP3"
    if data[4:8] == b"ftyp":
        return "MP4/M4A (AAC)"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "WebM/Matroska"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:5] == b"#!AMR":
        return "AMR"
    if data[:4] == b"FORM":
        return "AIFF"
    if data[:4] == b"caff":
        return "CAF"
    if data[:4] == b"RF64":
        return "RF64 WAV"
    return "not a recognised audio file"


def _check_length(seconds: float, source: str, max_seconds: float) -> None:
    if seconds <= 0:
        raise UnsupportedAudio(f"The recording ({source}) holds no audio")
    if seconds > max_seconds:
        raise UnsupportedAudio(
            f"The recording is {seconds:.1f} s long; pronunciation assessment takes at most "
            f"{max_seconds:g} s of audio (Azure Speech's short-audio limit): record a shorter clip"
        )


# -- WAV ----------------------------------------------------------------------------------------


def _prepare_wav(data: bytes, max_seconds: float) -> PreparedAudio:
    fmt, pcm = parse_wav(data)
    source = fmt.describe()
    seconds = len(pcm) / (fmt.rate * fmt.channels * (fmt.bits // 8))
    _check_length(seconds, source, max_seconds)
    as_is = fmt == WavFormat(_PCM, 1, TARGET_RATE, 16) and data[20:22] == b"\x01\x00"
    if as_is:
        return PreparedAudio(data, WAV_CONTENT_TYPE, seconds, source, converted=False)
    samples = _resample(_downmix(_to_int16(pcm, fmt), fmt.channels), fmt.rate, TARGET_RATE)
    body = wav_bytes(samples)
    return PreparedAudio(body, WAV_CONTENT_TYPE, len(samples) / TARGET_RATE, source, converted=True)


def parse_wav(data: bytes) -> tuple[WavFormat, bytes]:
    """The format and the sample bytes of a RIFF/WAVE file (a truncated or streaming-written
    `data` chunk is read up to the end of the file)."""
    fmt: WavFormat | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body_at = pos + 8
        if chunk_id == b"fmt ":
            fmt = _wav_format(data[body_at : body_at + size])
        elif chunk_id == b"data":
            if fmt is None:
                raise UnsupportedAudio(
                    "Unsupported audio: a WAV file whose data precedes its format"
                )
            end = len(data) if size in (0, 0xFFFFFFFF) else min(body_at + size, len(data))
            frame = fmt.channels * (fmt.bits // 8)
            end -= (end - body_at) % frame  # drop a torn last frame
            return fmt, data[body_at:end]
        pos = body_at + size + (size & 1)
    raise UnsupportedAudio("Unsupported audio: a WAV file without a format or data chunk")


def _wav_format(chunk: bytes) -> WavFormat:
    if len(chunk) < 16:
        raise UnsupportedAudio("Unsupported audio: a WAV file with a truncated format chunk")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", chunk)
    if tag == _EXTENSIBLE and len(chunk) >= 26:
        tag = struct.unpack_from("<H", chunk, 24)[0]  # the sub-format GUID's first two bytes
    if tag not in (_PCM, _FLOAT):
        name = _WAV_FORMAT_NAMES.get(tag, f"format tag 0x{tag:04x}")
        raise UnsupportedAudio(f"Unsupported audio format: WAV {name}. Accepted: {ACCEPTED}")
    wanted = (8, 16, 24, 32) if tag == _PCM else (32,)
    if bits not in wanted or not 1 <= channels <= 8 or not 4000 <= rate <= 384000:
        raise UnsupportedAudio(
            f"Unsupported audio format: WAV with {bits}-bit samples, {channels} channels, "
            f"{rate} Hz. Accepted: {ACCEPTED}"
        )
    return WavFormat(tag, channels, rate, bits)


def _to_int16(pcm: bytes, fmt: WavFormat) -> array[int]:
    """Interleaved samples as 16-bit integers (little-endian input, whatever this machine is)."""
    if fmt.tag == _FLOAT:
        floats = array("f", pcm)
        if sys.byteorder == "big":
            floats.byteswap()
        return array("h", (max(-32768, min(32767, int(x * 32767.0))) for x in floats))
    if fmt.bits == 8:  # unsigned, centred on 128
        return array("h", ((b - 128) << 8 for b in pcm))
    width = fmt.bits // 8
    if width == 2:
        high = pcm
    else:  # keep each sample's two most significant bytes
        out = bytearray(len(pcm) // width * 2)
        out[0::2] = pcm[width - 2 :: width]
        out[1::2] = pcm[width - 1 :: width]
        high = bytes(out)
    samples = array("h", high)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _downmix(samples: array[int], channels: int) -> array[int]:
    if channels == 1:
        return samples
    lanes = [samples[c::channels] for c in range(channels)]
    return array("h", (sum(frame) // channels for frame in zip(*lanes, strict=True)))


def _resample(samples: array[int], rate: int, target: int) -> array[int]:
    if rate == target or not samples:
        return samples
    values: list[float] | array[int] = samples
    width = round(rate / target)
    if width > 1:  # a moving average over one output period keeps most aliasing out
        sums = [0, *accumulate(samples)]
        n = len(samples)
        values = [(sums[min(i + width, n)] - sums[i]) / min(width, n - i) for i in range(n)]
    step = rate / target
    count = int(len(samples) / step)
    last = len(values) - 1

    def at(i: int) -> int:
        pos = i * step
        j = int(pos)
        if j >= last:
            return int(values[last])
        a = values[j]
        return int(a + (values[j + 1] - a) * (pos - j))

    return array("h", (at(i) for i in range(count)))


def wav_bytes(samples: array[int], rate: int = TARGET_RATE) -> bytes:
    """A canonical 44-byte-header WAV PCM 16-bit mono file of `samples`."""
    body = array("h", samples)
    if sys.byteorder == "big":
        body.byteswap()
    raw = body.tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + len(raw), b"WAVE", b"fmt ", 16, _PCM, 1, rate, rate * 2, 2, 16,
        b"data", len(raw),
    )  # fmt: skip
    return header + raw


# -- Ogg Opus -----------------------------------------------------------------------------------


def _prepare_ogg(data: bytes, max_seconds: float) -> PreparedAudio:
    pages = list(_ogg_pages(data))
    if not pages or not pages[0][1].startswith(b"OpusHead"):
        codec = "Vorbis" if pages and pages[0][1][1:7] == b"vorbis" else "not Opus"
        raise UnsupportedAudio(f"Unsupported audio format: Ogg {codec}. Accepted: {ACCEPTED}")
    head = pages[0][1]
    if len(head) < 19:
        raise UnsupportedAudio("Unsupported audio: an Ogg Opus file with a truncated OpusHead")
    channels = head[9]
    pre_skip = struct.unpack_from("<H", head, 10)[0]
    if channels != 1:
        raise UnsupportedAudio(
            f"Unsupported audio format: Ogg Opus with {channels} channels; Azure Speech takes "
            f"mono Opus only (WAV of any channel count is downmixed here). Accepted: {ACCEPTED}"
        )
    granule = max(g for g, _ in pages)
    seconds = max(granule - pre_skip, 0) / OPUS_GRANULE_RATE
    _check_length(seconds, "Ogg Opus", max_seconds)
    return PreparedAudio(data, OGG_OPUS_CONTENT_TYPE, seconds, "Ogg Opus", converted=False)


def _ogg_pages(data: bytes) -> list[tuple[int, bytes]]:
    """(granule position, first bytes of the page body) of each Ogg page, in order."""
    pages: list[tuple[int, bytes]] = []
    pos = 0
    while pos + 27 <= len(data) and data[pos : pos + 4] == b"OggS":
        granule = struct.unpack_from("<q", data, pos + 6)[0]
        segments = data[pos + 26]
        table_end = pos + 27 + segments
        body_size = sum(data[pos + 27 : table_end])
        pages.append((granule, data[table_end : table_end + min(body_size, 64)]))
        pos = table_end + body_size
    return pages
