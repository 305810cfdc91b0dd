"""assess-pronunciation end to end: the Node package's enqueue, the real service and BullMQ, the
recording from the Supabase stand-in's Storage (or its public URL), aiohttp against a local
Azure Speech short-audio stand-in. Audio is made here: WAV with `wave`, Ogg Opus page by page."""

from __future__ import annotations

import io
import itertools
import math
import struct
import time
import wave
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from processors import assess_pronunciation as ap
from processors import build_registry
from processors.shared import recording
from processors.shared.azure_speech import SpeechSettings
from tests.fakes import LocalServer
from tests.fakes.azure_speech_server import (
    KEY,
    FakeAzureSpeech,
    assessed,
    rate_limited,
    recognition,
    server_error,
)
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.harness import running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.provider_jobs import provider_env, provider_metric, run_job
from worker.errors import ConfigError, JobTypeDisabled, ProviderMissing
from worker.registry import Registry
from worker.service import Service

USER_ID = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"
BUCKET = "recordings"
REFERENCE = "Good morning, Sam."


def wav(seconds: float, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    """A 440 Hz tone as WAV PCM, little-endian, made with the stdlib."""
    frames = bytearray()
    for i in range(int(rate * seconds)):
        value = int(12000 * math.sin(2 * math.pi * 440 * i / rate))
        sample = struct.pack("<i", value << 16)[4 - width :] if width > 1 else bytes(
            [(value >> 8) + 128]
        )  # fmt: skip
        frames += sample * channels
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return out.getvalue()


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def _ogg_page(flags: int, granule: int, sequence: int, packets: list[bytes]) -> bytes:
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, 0x5EED, sequence, 0,
                         len(lacing))  # fmt: skip
    page = header + bytes(lacing) + b"".join(packets)
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def ogg_opus(seconds: float, channels: int = 1) -> bytes:
    """A real Ogg Opus stream (RFC 7845): OpusHead, OpusTags, then 20 ms TOC-only packets
    (valid Opus, decoded as silence), the last page's granule giving the duration."""
    pre_skip = 312
    head = struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, 16000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    frames = int(seconds * 50)
    packets = [b"\xf8"] * frames  # config 31 (CELT, 20 ms), mono, one frame
    return (
        _ogg_page(2, 0, 0, [head])
        + _ogg_page(0, 0, 1, [tags])
        + _ogg_page(4, pre_skip + frames * 960, 2, packets)
    )


class AudioHost(LocalServer):
    """Files by URL, as a CDN or a presigned link serves them; `fail_next` answers a status."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.failures: deque[int] = deque()

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/{name}", self._get)

    async def _get(self, request: web.Request) -> web.Response:
        if self.failures:
            return web.Response(status=self.failures.popleft(), text="unavailable")
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")


class World:
    def __init__(
        self,
        azure: FakeAzureSpeech,
        db: FakePostgrest,
        host: AudioHost,
        queue: str,
        service: Service,
    ) -> None:
        self.azure = azure
        self.db = db
        self.host = host
        self.queue = queue
        self.service = service

    def stored(self, data: bytes, name: str = "take.wav") -> dict[str, Any]:
        path = f"{USER_ID}/{time.time_ns()}-{name}"
        self.db.storage.put(BUCKET, path, data, "application/octet-stream")
        return {"referenceText": REFERENCE, "audioFilePath": f"{BUCKET}/{path}", "userId": USER_ID}

    def at_url(self, data: bytes, name: str = "take.wav") -> dict[str, Any]:
        name = f"{time.time_ns()}-{name}"
        self.host.files[name] = data
        return {"referenceText": REFERENCE, "audioUrl": f"{self.host.origin}/{name}?sig=secret"}

    def metric(self, name: str, **labels: str) -> float | None:
        return provider_metric(
            self.service, self.queue, ap.JOB_NAME, "azure-speech", name, **labels
        )


def env_for(
    azure: FakeAzureSpeech, key: str = KEY, db: FakePostgrest | None = None
) -> dict[str, str]:
    return provider_env(db, AZURE_SPEECH_KEY=key, AZURE_SPEECH_ENDPOINT=azure.origin)


@pytest.fixture
async def world(redis_url: str, queue_name: str) -> AsyncIterator[World]:
    async with FakeAzureSpeech() as azure, FakePostgrest() as db, AudioHost() as host:
        db.storage.create_bucket(BUCKET)
        registry = Registry()
        registry.register(ap.build(env_for(azure, db=db)))
        async with running_service(settings_for(redis_url, queue_name), registry) as service:
            yield World(azure, db, host, queue_name, service)


async def run(node: NodeBridge, queue: str, data: dict[str, Any]) -> dict[str, Any]:
    return await run_job(node, queue, ap.JOB_NAME, data)


def failed_at_once(job: dict[str, Any]) -> str:
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    return str(job["failedReason"])


# --- the job, end to end ---------------------------------------------------------------------


async def test_assesses_a_wav_from_storage_end_to_end(world: World, node6: NodeBridge) -> None:
    recording = wav(1.5)
    job = await run(node6, world.queue, world.stored(recording))
    assert job["state"] == "completed", job
    returned = job["returnvalue"]
    assert (await node6.validate("result", ap.JOB_NAME, returned))["valid"]
    result = returned["result"]
    assert result["referenceText"] == REFERENCE and result["recognizedText"] == REFERENCE
    assert result["pronunciationScore"] == 88.0 and result["passed"] is True
    assert [w["word"] for w in result["words"]] == ["good", "morning", "sam"]
    assert result["words"][2]["phonemes"] == [{"phoneme": c, "accuracyScore": 88.0} for c in "sam"]
    (sent,) = world.azure.requests
    assert sent.raw == recording  # 16 kHz 16-bit mono: sent as it is
    assert sent.header("Content-Type") == "audio/wav; codecs=audio/pcm; samplerate=16000"
    assert sent.header("Ocp-Apim-Subscription-Key") == KEY
    assert sent.param("language") == "en-US" and sent.param("format") == "detailed"
    assert world.azure.assessments == [
        {"ReferenceText": REFERENCE, "GradingSystem": "HundredMark", "Granularity": "Phoneme",
         "Dimension": "Comprehensive", "EnableMiscue": True}
    ]  # fmt: skip
    # 1.5 audio seconds, at the default $1 per hour
    assert world.metric("worker_provider_usage_total", unit="audio-seconds") == 1.5
    assert world.metric("worker_provider_cost_usd_total") == pytest.approx(1.5 / 3600)


async def test_other_wav_is_converted_and_a_url_is_fetched(world: World, node6: NodeBridge) -> None:
    world.azure.script(assessed(52.5, nested=True))  # the guide's nested JSON shape
    data = world.at_url(wav(1.0, rate=44100, channels=2)) | {"language": "de-DE"}
    job = await run(node6, world.queue, data)
    assert job["state"] == "completed", job
    result = job["returnvalue"]["result"]
    assert result["pronunciationScore"] == 52.5 and result["passed"] is False
    assert result["words"][0]["accuracyScore"] == 52.5
    (sent,) = world.azure.requests
    fmt, pcm = recording.parse_wav(sent.raw)  # the stand-in refuses anything but 16 kHz mono
    assert (fmt.rate, fmt.channels, fmt.bits, len(pcm)) == (16000, 1, 16, 32000)
    assert sent.param("language") == "de-DE"


async def test_ogg_opus_is_sent_as_it_is(world: World, node6: NodeBridge) -> None:
    recording = ogg_opus(2.0)
    job = await run(node6, world.queue, world.at_url(recording, "take.ogg"))
    assert job["state"] == "completed", job
    (sent,) = world.azure.requests
    assert sent.raw == recording and sent.header("Content-Type") == "audio/ogg; codecs=opus"
    assert world.metric("worker_provider_usage_total", unit="audio-seconds") == 2.0


# --- one test per error row ------------------------------------------------------------------


async def test_rate_limit_waits_without_using_an_attempt(world: World, node6: NodeBridge) -> None:
    world.azure.script(rate_limited(1), assessed())
    job = await run(node6, world.queue, world.stored(wav(0.5)))
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1 and world.azure.calls == 2
    first, second = world.azure.requests
    assert second.at - first.at >= 0.9  # Retry-After waited out


async def test_server_error_is_retried(world: World, node6: NodeBridge) -> None:
    world.azure.script(server_error(503), assessed())
    job = await run(node6, world.queue, world.stored(wav(0.5)))
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 2 and world.azure.calls == 2


async def test_no_speech_fails_at_once(world: World, node6: NodeBridge) -> None:
    world.azure.script(recognition("InitialSilenceTimeout"))
    reason = failed_at_once(await run(node6, world.queue, world.stored(wav(0.5))))
    assert "No speech to assess" in reason and "InitialSilenceTimeout" in reason


async def test_unsupported_audio_fails_at_once_naming_the_formats(
    world: World, node6: NodeBridge
) -> None:
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 100
    reason = failed_at_once(await run(node6, world.queue, world.stored(mp3, "take.mp3")))
    assert reason.startswith("Unsupported audio format: MP3. Accepted: WAV PCM")
    assert "Ogg Opus" in reason and world.azure.calls == 0


async def test_audio_over_30_s_fails_at_once(world: World, node6: NodeBridge) -> None:
    long_take = wav(31, rate=8000, width=1)
    reason = failed_at_once(await run(node6, world.queue, world.stored(long_take)))
    assert "31.0 s long" in reason and "at most 30 s" in reason and world.azure.calls == 0


async def test_recording_errors(world: World, node6: NodeBridge) -> None:
    """A missing object or URL fails at once (no signature in the reason); a URL that answers
    503 is tried again."""
    missing = world.stored(b"") | {"audioFilePath": f"{BUCKET}/{USER_ID}/gone.wav"}
    reason = failed_at_once(await run(node6, world.queue, missing))
    assert "no such object" in reason and "gone.wav" in reason
    gone = {"referenceText": REFERENCE, "audioUrl": f"{world.host.origin}/gone.wav?sig=secret"}
    reason = failed_at_once(await run(node6, world.queue, gone))
    assert (
        reason == f"Could not download the recording (HTTP 404) from {world.host.origin}/gone.wav"
    )
    world.host.failures.append(503)
    job = await run(node6, world.queue, world.at_url(wav(0.5)))
    assert job["state"] == "completed" and job["attemptsMade"] == 2, job
    assert world.azure.calls == 1


async def test_bad_key_fails_at_once_naming_it(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    async with FakeAzureSpeech() as azure, AudioHost() as host:
        registry = Registry()
        registry.register(ap.build(env_for(azure, key="wrong-key")))  # no Supabase
        host.files["take.wav"] = wav(0.5)
        url = f"{host.origin}/take.wav"
        async with running_service(settings_for(redis_url, queue_name), registry):
            bad_key = await run(node6, queue_name, {"referenceText": "Hi", "audioUrl": url})
            stored = await run(node6, queue_name, {"referenceText": "Hi", "audioFilePath": "a/b"})
    reason = failed_at_once(bad_key)
    assert "401" in reason and "AZURE_SPEECH_KEY" in reason and "AZURE_SPEECH_ENDPOINT" in reason
    assert azure.calls == 1
    # without Supabase an audioFilePath job fails at once naming its variables
    assert failed_at_once(stored) == (
        "assess-pronunciation from Supabase Storage needs Supabase: set "
        "EXPO_PUBLIC_SUPABASE_URL or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"
    )


async def test_without_variables_the_type_is_disabled(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    with pytest.raises(ProviderMissing) as missing:
        ap.build({"AZURE_SPEECH_KEY": "k"})
    sentence = missing.value.sentence
    assert sentence == (
        "assess-pronunciation is disabled: Azure Speech is not configured (set "
        "AZURE_SPEECH_KEY and AZURE_SPEECH_REGION (or AZURE_SPEECH_ENDPOINT))"
    )
    with pytest.raises(ConfigError, match="AZURE_SPEECH_REGION: expected a region name"):
        ap.build({"AZURE_SPEECH_KEY": "k", "AZURE_SPEECH_REGION": "West Europe"})
    registry = build_registry({}, ["ping", ap.JOB_NAME])  # start-up goes on
    assert registry.names() == ["ping"] and registry.disabled == {ap.JOB_NAME: sentence}
    with pytest.raises(JobTypeDisabled, match="assess-pronunciation is disabled"):
        registry.get(ap.JOB_NAME)
    async with running_service(settings_for(redis_url, queue_name), registry):
        job = await run(node6, queue_name, {"referenceText": "Hi", "audioUrl": "http://x/a"})
    assert failed_at_once(job) == sentence


# --- audio preparation, without Redis --------------------------------------------------------


def test_region_gives_the_regional_host() -> None:
    spec = ap.build({"AZURE_SPEECH_KEY": "k", "AZURE_SPEECH_REGION": "westeurope"})
    assert spec.name == ap.JOB_NAME and spec.notes  # audioUrl only: no Supabase here
    settings = SpeechSettings.from_env({"AZURE_SPEECH_KEY": "k", "AZURE_SPEECH_REGION": "x1"})
    assert settings is not None
    assert str(settings.url) == (
        "https://x1.stt.speech.microsoft.com/speech/recognition/conversation/cognitiveservices/v1"
    )
    sovereign = SpeechSettings.from_env(
        {"AZURE_SPEECH_KEY": "k", "AZURE_SPEECH_ENDPOINT": "chinaeast2.stt.speech.azure.cn/"}
    )
    assert sovereign is not None and str(sovereign.url).startswith(
        "https://chinaeast2.stt.speech.azure.cn/speech/recognition/"
    )


@pytest.mark.parametrize(
    ("rate", "channels", "width"), [(44100, 2, 2), (48000, 1, 3), (8000, 1, 1), (22050, 2, 4)]
)
def test_wav_conversion_keeps_the_tone(rate: int, channels: int, width: int) -> None:
    prepared = recording.prepare(wav(0.5, rate, channels, width), 30)
    assert prepared.converted and prepared.seconds == pytest.approx(0.5, abs=0.001)
    fmt, pcm = recording.parse_wav(prepared.body)
    assert (fmt.rate, fmt.channels, fmt.bits) == (16000, 1, 16)
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)
    crossings = sum(1 for a, b in itertools.pairwise(samples) if a < 0 <= b)
    assert crossings == pytest.approx(220, abs=2)  # still 440 Hz over 0.5 s
    assert 9000 < max(samples) <= 12100  # loudness kept (8-bit: coarser)


def test_ogg_checks() -> None:
    assert recording.prepare(ogg_opus(1.5), 30).seconds == pytest.approx(1.5)
    with pytest.raises(recording.UnsupportedAudio, match="Ogg Opus with 2 channels"):
        recording.prepare(ogg_opus(1.0, channels=2), 30)
    vorbis = _ogg_page(2, 0, 0, [b"\x01vorbis" + bytes(22)])
    with pytest.raises(recording.UnsupportedAudio, match="Ogg Vorbis"):
        recording.prepare(vorbis, 30)
