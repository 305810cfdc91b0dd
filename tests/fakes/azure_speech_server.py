"""A local server speaking Azure Speech's speech-to-text REST API for short audio, with
pronunciation assessment, for `assess-pronunciation`.

`POST /speech/recognition/conversation/cognitiveservices/v1?language=..&format=detailed` with
the key in `Ocp-Apim-Subscription-Key`, the audio as the body, `Content-Type` one of the two
accepted values (`audio/wav; codecs=audio/pcm; samplerate=16000`, `audio/ogg; codecs=opus`) and
the base64 JSON `Pronunciation-Assessment` header. Checked as the service would: no key → 403,
a wrong key → 401, no language → 400, another content type, a WAV that is not 16 kHz 16-bit
mono PCM or an Ogg body without OpusHead → 400, an undecodable assessment header → 400.

Each valid request takes the next scripted reply; an empty script (or `assessed()`) answers
a Success whose words are the reference text's, scored as `assessed` says, in the REST page's
shape (scores beside the fields) or, with `nested=True`, the pronunciation guide's shape
(scores in `PronunciationAssessment` objects).
"""

from __future__ import annotations

import base64
import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import LocalServer, json_response

PATH = "/speech/recognition/conversation/cognitiveservices/v1"
KEY = "azure-speech-test-key"
CONTENT_TYPES = ("audio/wav; codecs=audio/pcm; samplerate=16000", "audio/ogg; codecs=opus")


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # None with 200: an assessment of the request's reference text
    headers: dict[str, str] = field(default_factory=dict)
    score: float = 88.0
    nested: bool = False


def assessed(score: float = 88.0, nested: bool = False) -> Reply:
    return Reply(score=score, nested=nested)


def recognition(status: str) -> Reply:
    """A 200 whose recognition found nothing: NoMatch, InitialSilenceTimeout, ..."""
    return Reply(200, {"RecognitionStatus": status, "Offset": 0, "Duration": 0})


def error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status, {"error": {"code": str(status), "message": message}}, headers)


def rate_limited(retry_after_s: int = 1) -> Reply:
    return error(429, "Too many requests", **{"Retry-After": str(retry_after_s)})


def server_error(status: int = 500) -> Reply:
    return error(status, "Internal server error")


def assessment(reference: str, score: float, nested: bool) -> dict[str, Any]:
    """A detailed Success with pronunciation assessment of `reference`, every word said."""

    def scored(node: dict[str, Any], **scores: Any) -> dict[str, Any]:
        return node | ({"PronunciationAssessment": scores} if nested else scores)

    def word(text: str) -> dict[str, Any]:
        phonemes = [scored({"Phoneme": c, "Duration": 100000}, AccuracyScore=score) for c in text]
        node = {"Word": text, "Offset": 700000, "Duration": 2600000, "Phonemes": phonemes}
        return scored(node, AccuracyScore=score, ErrorType="None")

    words = [w.strip(".,!?;:").lower() for w in reference.split()]
    lexical = " ".join(words)
    best = {"Confidence": 0.98, "Lexical": lexical, "ITN": lexical, "MaskedITN": lexical,
            "Display": reference, "Words": [word(w) for w in words]}  # fmt: skip
    scores = {"AccuracyScore": score, "FluencyScore": 100.0, "CompletenessScore": 100.0,
              "PronScore": score}  # fmt: skip
    return {
        "RecognitionStatus": "Success",
        "Offset": 700000,
        "Duration": 8400000,
        "DisplayText": reference,
        "SNR": 38.8,
        "NBest": [scored(best, **scores)],
    }


def wav_problem(body: bytes) -> str | None:
    """Why `body` is not the WAV PCM 16 kHz 16-bit mono the content type promised."""
    if body[:4] != b"RIFF" or body[8:12] != b"WAVE" or body[12:16] != b"fmt ":
        return "not a RIFF/WAVE file with its fmt chunk first"
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body, 20)
    if (tag, channels, rate, bits) != (1, 1, 16000, 16):
        return f"WAV is format {tag}, {channels} channels, {rate} Hz, {bits}-bit"
    return None


class FakeAzureSpeech(LocalServer):
    def __init__(self, key: str = KEY) -> None:
        super().__init__()
        self.key = key
        self.queue: deque[Reply] = deque()
        self.assessments: list[dict[str, Any]] = []  # each decoded Pronunciation-Assessment

    def script(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    @property
    def calls(self) -> int:
        return sum(1 for r in self.requests if r.path == PATH)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self._recognize)

    async def _recognize(self, request: web.Request) -> web.Response:
        reply, params = self._check(request, await request.read())
        if reply is None:
            reply = self.queue.popleft() if self.queue else assessed()
        if reply.status == 200 and reply.body is None:
            body = assessment(params.get("ReferenceText", ""), reply.score, reply.nested)
            return json_response(200, body, reply.headers)
        return json_response(reply.status, reply.body, reply.headers)

    def _check(self, request: web.Request, body: bytes) -> tuple[Reply | None, dict[str, Any]]:
        key = request.headers.get("Ocp-Apim-Subscription-Key")
        if not key:
            return error(403, "Subscription key or authorization token is missing"), {}
        if key != self.key:
            return error(401, "Access denied due to invalid subscription key or wrong API "
                         "endpoint. Make sure to provide a valid key for an active "
                         "subscription and use a correct regional API endpoint for your "
                         "resource."), {}  # fmt: skip
        if not request.query.get("language"):
            return error(400, "The language parameter is required"), {}
        content_type = request.headers.get("Content-Type", "")
        if content_type not in CONTENT_TYPES:
            return error(400, f"Unsupported content type {content_type!r}"), {}
        if content_type.startswith("audio/wav") and (problem := wav_problem(body)):
            return error(400, f"Invalid audio: {problem}"), {}
        if content_type.startswith("audio/ogg") and (body[:4] != b"OggS" or b"OpusHead" not in
                                                     body[:200]):  # fmt: skip
            return error(400, "Invalid audio: not an Ogg Opus stream"), {}
        try:
            params = json.loads(base64.b64decode(request.headers["Pronunciation-Assessment"]))
            assert isinstance(params, dict) and params.get("ReferenceText")
        except (KeyError, ValueError, AssertionError):
            return error(400, "Invalid Pronunciation-Assessment header"), {}
        self.assessments.append(params)
        return None, params
