"""`assess-pronunciation`: how well a recording says a reference text, by Azure Speech.

Steps: progress 10 → the recording, from Supabase Storage (`audioFilePath` = `<bucket>/<path>`)
or a URL (`audioUrl`), at most MAX_AUDIO_BYTES → made ready in a worker thread
(processors.shared.recording: WAV 16 kHz mono and Ogg Opus as they are, other WAV converted,
the rest refused; at most MAX_AUDIO_S) → progress 40 → azure-speech's breaker and rate limit
(worker.providers) → one short-audio REST call with pronunciation assessment
(processors.shared.azure_speech) → audio seconds and their cost reported → progress 100 and
`{"success": true, "result": {scores, recognizedText, referenceText, passed, words}}`.

Optional: without AZURE_SPEECH_KEY and AZURE_SPEECH_REGION (or AZURE_SPEECH_ENDPOINT) the job
type is not built (`ProviderMissing`) and its jobs fail at once saying so. Without Supabase,
`audioFilePath` jobs fail at once naming its variables; `audioUrl` jobs run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import aiohttp

from processors.shared import recording, url_fetch
from processors.shared.azure_speech import (
    ENDPOINT_VARIABLE,
    KEY_VARIABLE,
    REGION_VARIABLE,
    SpeechSettings,
    recognition_failure,
    recognize,
)
from processors.shared.supabase_storage import (
    MB,
    SupabaseStorage,
    missing_sentence,
    split_storage_path,
)
from worker.context import JobContext
from worker.contract_types import (
    PronunciationPayload,
    PronunciationResult,
    PronunciationWord,
)
from worker.errors import (
    ConfigProblems,
    JobError,
    PermanentJobError,
    ProviderMissing,
    RetryableJobError,
)
from worker.providers import AZURE_SPEECH, Provider, ProviderSettings
from worker.registry import ProcessorSpec

JOB_NAME = "assess-pronunciation"
QUEUE = "audio-jobs"  # INTEROP §7: where the web service enqueues it
# Azure: "For pronunciation assessment, the audio duration should be no more than 30 seconds"
# (speech-to-text REST API for short audio).
MAX_AUDIO_S = 30.0
# 30 s of 48 kHz stereo 32-bit WAV is 11.5 MB; 16 kHz mono 16-bit, under 1 MB.
MAX_AUDIO_BYTES = 16 * MB
PASS_SCORE = 60.0  # INTEROP §7: passed when the pronunciation score is at least this
DEFAULT_LANGUAGE = "en-US"
# Download (30 s) + conversion + Azure (30 s), with room; shorter than WORKER_JOB_TIMEOUT_S.
JOB_TIMEOUT_S = 120.0


# --- the processor -------------------------------------------------------------------------


def build(env: Mapping[str, str]) -> ProcessorSpec:
    problems = ConfigProblems()
    speech = problems.take(lambda: SpeechSettings.from_env(env))
    protection = problems.take(lambda: ProviderSettings.from_env(AZURE_SPEECH, env))
    storage = problems.take(lambda: SupabaseStorage.from_env(env))  # None: audioUrl only
    problems.raise_any()  # every malformed variable at once, Supabase's too
    if speech is None:
        where = f"{REGION_VARIABLE} (or {ENDPOINT_VARIABLE})"
        raise ProviderMissing(JOB_NAME, "Azure Speech", [KEY_VARIABLE, where])
    assert protection is not None
    processor = PronunciationProcessor(speech, Provider(protection, "pronunciation"), storage)
    return ProcessorSpec(
        name=JOB_NAME,
        handler=processor.run,
        description="pronunciation assessment by Azure Speech (short-audio REST)",
        notes=() if storage else (f"audioUrl only ({missing_sentence(JOB_NAME)})",),
        aclose=processor.aclose,
        timeout_s=JOB_TIMEOUT_S,
    )


class PronunciationProcessor:
    def __init__(
        self,
        speech: SpeechSettings,
        provider: Provider,
        storage: SupabaseStorage | None,
    ) -> None:
        self.speech = speech
        self.provider = provider
        self.storage = storage
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """One connection pool for Azure and downloads, made in the running loop."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60), raise_for_status=False
            )
        return self._session

    async def run(self, data: dict[str, Any], ctx: JobContext) -> PronunciationResult:
        payload = cast(PronunciationPayload, data)  # validated against the contract
        await ctx.progress(10)
        raw = await self.recording(payload)
        prepared = await asyncio.to_thread(recording.prepare, raw, MAX_AUDIO_S)
        await ctx.progress(40)
        language = payload.get("language") or DEFAULT_LANGUAGE
        async with self.provider.call(ctx.redis) as permit:
            try:
                body = await recognize(
                    self.session(), self.speech, prepared, payload["referenceText"], language
                )
            except Exception as exc:
                raise await permit.failed(as_job_error(exc)) from exc
            if (failure := recognition_failure(body)) is not None:
                raise await permit.failed(failure)
            await permit.succeeded()
        seconds = round(prepared.seconds, 2)
        usd = ctx.provider_usage(AZURE_SPEECH, "audio-seconds", seconds)
        result = to_result(body, payload["referenceText"])
        ctx.log.info(
            "Azure Speech pronunciation assessment: audio seconds assessed {} (~${:.4f}), {}{}, "
            "language {}, pronunciation score {}, passed {}",
            seconds,
            usd,
            prepared.source,
            " converted to WAV 16 kHz mono 16-bit" if prepared.converted else " sent as is",
            language,
            result["result"]["pronunciationScore"],
            result["result"]["passed"],
        )
        await ctx.progress(100)
        return result

    async def recording(self, payload: PronunciationPayload) -> bytes:
        path = payload.get("audioFilePath")
        if path is None:
            return await url_fetch.download(
                self.session(), payload["audioUrl"], MAX_AUDIO_BYTES, "recording"
            )
        if self.storage is None:
            raise PermanentJobError(missing_sentence(JOB_NAME))
        try:
            bucket, key = split_storage_path(path)
        except ValueError as exc:
            raise PermanentJobError(f"audioFilePath: {exc}") from None
        return await self.storage.download(bucket, key, MAX_AUDIO_BYTES, "recording")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self.storage is not None:
            await self.storage.aclose()


def as_job_error(exc: Exception) -> JobError:
    if isinstance(exc, JobError):
        return exc
    return RetryableJobError(f"Azure Speech call failed: {type(exc).__name__}: {exc}")


def _field(node: Mapping[str, Any], name: str) -> Any:
    """A field of an NBest entry, word or phoneme: nested in `PronunciationAssessment` (the
    pronunciation guide's JSON) or beside it (the REST page's); None when absent."""
    scores = node.get("PronunciationAssessment")
    if isinstance(scores, Mapping) and name in scores:
        return scores[name]
    return node.get(name)


def _score(node: Mapping[str, Any], name: str) -> float:
    """A 0-100 score; absent (an omitted word has none) counts 0."""
    value = _field(node, name)
    return min(max(float(value), 0.0), 100.0) if isinstance(value, int | float) else 0.0


def _text(node: Mapping[str, Any], name: str) -> str:
    value = _field(node, name)
    return value if isinstance(value, str) else ""


def to_result(body: Mapping[str, Any], reference_text: str) -> PronunciationResult:
    """Azure's detailed recognition with pronunciation assessment → the contract's result."""
    nbest = body.get("NBest")
    if not isinstance(nbest, list) or not nbest or not isinstance(nbest[0], Mapping):
        raise PermanentJobError("Azure Speech recognised the audio but returned no assessment")
    best = nbest[0]
    if _field(best, "AccuracyScore") is None and _field(best, "PronScore") is None:
        raise PermanentJobError(
            "Azure Speech returned no pronunciation scores (is pronunciation assessment "
            "available for this language in the resource's region?)"
        )
    words: list[PronunciationWord] = [
        {
            "word": _text(word, "Word"),
            "accuracyScore": _score(word, "AccuracyScore"),
            "errorType": _text(word, "ErrorType") or "None",
            "phonemes": [
                {"phoneme": _text(p, "Phoneme"), "accuracyScore": _score(p, "AccuracyScore")}
                for p in word.get("Phonemes") or []
                if isinstance(p, Mapping)
            ],
        }
        for word in best.get("Words") or []
        if isinstance(word, Mapping)
    ]
    pronunciation = _score(best, "PronScore")
    recognized = body.get("DisplayText") or best.get("Display") or ""
    return {
        "success": True,
        "result": {
            "accuracyScore": _score(best, "AccuracyScore"),
            "fluencyScore": _score(best, "FluencyScore"),
            "completenessScore": _score(best, "CompletenessScore"),
            "pronunciationScore": pronunciation,
            "recognizedText": recognized if isinstance(recognized, str) else "",
            "referenceText": reference_text,
            "passed": pronunciation >= PASS_SCORE,
            "words": words,
        },
    }
