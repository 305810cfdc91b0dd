"""Azure Speech's speech-to-text REST API for short audio, with pronunciation assessment.

    POST https://<region>.stt.speech.microsoft.com/speech/recognition/conversation/
         cognitiveservices/v1?language=en-US&format=detailed
    Ocp-Apim-Subscription-Key: <key>
    Content-Type: audio/wav; codecs=audio/pcm; samplerate=16000 | audio/ogg; codecs=opus
    Accept: application/json
    Pronunciation-Assessment: base64(JSON {ReferenceText, GradingSystem: HundredMark,
                              Granularity: Phoneme, Dimension: Comprehensive, EnableMiscue})

The answer is `{"RecognitionStatus", "DisplayText", "NBest": [{..., scores, "Words": [...]}]}`.
The REST page shows the scores on the NBest entry and on each word (`AccuracyScore`,
`FluencyScore`, `CompletenessScore`, `PronScore`; `ErrorType`); the pronunciation guide's
JSON nests them in `PronunciationAssessment` objects (phonemes too). Both are read.

Errors, as the caller raises them (after the breaker has seen them):

    429                                        → RateLimited (Retry-After; no attempt used)
    5xx, 408, timeout, connection              → RetryableJobError
    RecognitionStatus Error                    → RetryableJobError (Azure: "try again")
    401 / 403                                  → PermanentJobError naming the key and region
    400 (language, audio refused) and other 4xx → PermanentJobError with Azure's reason
    NoMatch / InitialSilenceTimeout / BabbleTimeout → PermanentJobError: nothing to assess
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from processors.shared.recording import PreparedAudio
from processors.shared.retry_after import retry_after_s
from worker.errors import ConfigError, JobError, PermanentJobError, RateLimited, RetryableJobError
from worker.providers import AZURE_SPEECH

KEY_VARIABLE = "AZURE_SPEECH_KEY"
REGION_VARIABLE = "AZURE_SPEECH_REGION"
ENDPOINT_VARIABLE = "AZURE_SPEECH_ENDPOINT"
PATH = "/speech/recognition/conversation/cognitiveservices/v1"
# INTEROP §7: the old worker gave Azure Speech 30 s; 30 s of audio is assessed in a few.
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
DEFAULT_RETRY_AFTER_S = 10.0
# Why a recognition found nothing to score, in the words a learner's app can show.
NO_SPEECH = {
    "NoMatch": "speech was heard but no words of the chosen language were recognised (is "
    "`language` the language spoken?)",
    "InitialSilenceTimeout": "the recording starts with silence only and no speech was heard",
    "BabbleTimeout": "the recording starts with noise only and no speech was heard",
}


@dataclass(frozen=True)
class SpeechSettings:
    key: str = field(repr=False)
    url: URL  # the full short-audio recognition URL, without the query
    where: str = REGION_VARIABLE  # the variable that placed `url`, for messages

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SpeechSettings | None:
        """The settings, or None without a key or without both a region and an endpoint."""
        key = env.get(KEY_VARIABLE, "").strip()
        region = env.get(REGION_VARIABLE, "").strip()
        endpoint = env.get(ENDPOINT_VARIABLE, "").strip()
        if not key or not (region or endpoint):
            return None
        if endpoint:  # tests, sovereign clouds, a custom domain: it wins over the region
            return cls(key, endpoint_url(endpoint), ENDPOINT_VARIABLE)
        if not re.fullmatch(r"[a-z0-9]+", region):
            raise ConfigError(REGION_VARIABLE, f"expected a region name such as westeurope, "
                              f"got {region!r}")  # fmt: skip
        return cls(key, URL(f"https://{region}.stt.speech.microsoft.com{PATH}"))


def endpoint_url(endpoint: str) -> URL:
    """AZURE_SPEECH_ENDPOINT (`https://host[:port]`, optionally with the path) → the URL."""
    url = URL(endpoint if "://" in endpoint else f"https://{endpoint}")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(ENDPOINT_VARIABLE, f"expected an http(s) URL such as "
                          f"https://chinaeast2.stt.speech.azure.cn, got {endpoint!r}")  # fmt: skip
    path = url.path.rstrip("/")
    return url.with_path(path if path.endswith(PATH) else path + PATH).with_query(None)


def assessment_header(reference_text: str) -> str:
    """The `Pronunciation-Assessment` header: base64 of its JSON parameters."""
    params = {
        "ReferenceText": reference_text,
        "GradingSystem": "HundredMark",
        "Granularity": "Phoneme",
        "Dimension": "Comprehensive",
        "EnableMiscue": True,
    }
    raw = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.b64encode(raw).decode("ascii")


async def recognize(
    session: aiohttp.ClientSession,
    settings: SpeechSettings,
    audio: PreparedAudio,
    reference_text: str,
    language: str,
) -> dict[str, Any]:
    """One recognition with pronunciation assessment: Azure's JSON answer, or a JobError."""
    headers = {
        "Ocp-Apim-Subscription-Key": settings.key,
        "Content-Type": audio.content_type,
        "Accept": "application/json",
        "Pronunciation-Assessment": assessment_header(reference_text),
    }
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    url = settings.url.with_query(language=language, format="detailed")
    try:
        async with session.post(url, data=audio.body, headers=headers, timeout=timeout) as response:
            text = await response.text(errors="replace")
            if response.status != 200:
                raise http_error(settings, response.status, text, response.headers)
    except TimeoutError as exc:
        raise RetryableJobError(f"Azure Speech did not answer within {REQUEST_TIMEOUT_S:g} s") \
            from exc  # fmt: skip
    except aiohttp.ClientError as exc:
        raise RetryableJobError(f"Could not reach Azure Speech: {type(exc).__name__}: {exc}") \
            from exc  # fmt: skip
    try:
        body = json.loads(text)
    except ValueError:
        raise RetryableJobError(f"Azure Speech answered 200 with no JSON: {text[:200]!r}") from None
    if not isinstance(body, dict):
        raise RetryableJobError(f"Azure Speech answered 200 with {type(body).__name__} JSON")
    return body


def http_error(
    settings: SpeechSettings, status: int, text: str, headers: Mapping[str, str]
) -> JobError:
    reason = _reason(text)
    tag = f"HTTP {status}"
    if status == 429:
        return RateLimited(retry_after_s(headers, DEFAULT_RETRY_AFTER_S),
                           f"Azure Speech rate limit ({tag})",
                           provider=AZURE_SPEECH)  # fmt: skip
    if status in (401, 403):
        return PermanentJobError(
            f"Azure Speech refused the credentials ({tag}): check {KEY_VARIABLE} and "
            f"{settings.where} (the key must belong to the resource's region): {reason}"
        )
    if status == 408 or status >= 500:
        return RetryableJobError(f"Azure Speech is temporarily unavailable ({tag}): {reason}")
    return PermanentJobError(
        f"Azure Speech refused the request ({tag}; an unsupported language or unreadable "
        f"audio): {reason}"
    )


def _reason(text: str) -> str:
    """Azure's `{"error": {"code", "message"}}` message, else the body's first characters."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        message = None
    return str(message or text.strip() or "(no body)")[:300]


def recognition_failure(body: Mapping[str, Any]) -> JobError | None:
    """None when the recognition succeeded, else what its RecognitionStatus means."""
    status = body.get("RecognitionStatus")
    if status in ("Success", 0):
        return None
    if status in NO_SPEECH:
        return PermanentJobError(f"No speech to assess: {NO_SPEECH[status]} (Azure Speech "
                                 f"RecognitionStatus {status})")  # fmt: skip
    if status == "Error":
        return RetryableJobError("Azure Speech hit an internal error (RecognitionStatus Error)")
    return PermanentJobError(f"Azure Speech could not recognise the audio (RecognitionStatus "
                             f"{status!r})")  # fmt: skip
