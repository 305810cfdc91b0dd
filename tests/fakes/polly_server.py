"""A local server speaking Amazon Polly's SynthesizeSpeech (REST-JSON), for the audio job types.

`POST /v1/speech` with a SigV4 `Authorization` header and a JSON body `{Engine, LanguageCode,
OutputFormat, SampleRate, Text, TextType, VoiceId}`, answered as Polly answers: `audio/mpeg`
bytes (real MP3 frames: one silent 24 ms MPEG-2 Layer III frame per character of text) with
`x-amzn-RequestCharacters`, or an error as REST-JSON services send them (`x-amzn-ErrorType`
header and `{"message"}`): 400 ThrottlingException, 400 TextLengthExceededException (over
3,000 characters), 403 UnrecognizedClientException (a key id other than `key_id`), 500
ServiceFailureException. The real boto3 Polly client, pointed here by AWS_ENDPOINT_URL_POLLY,
runs against it unmodified. Moto, which serves S3 for these tests, has no SynthesizeSpeech.

Each request takes the next scripted reply (`script`); an empty script synthesises.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from processors.shared.mp3 import silent_frames
from tests.fakes import LocalServer

SPEECH_PATH = "/v1/speech"
KEY_ID = "AKIAPOLLYTESTKEY0001"
SECRET = "polly-test-secret"
MAX_CHARACTERS = 3000
_CREDENTIAL = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/polly/aws4_request")


@dataclass(frozen=True)
class Reply:
    """A scripted answer: `status` 200 synthesises the request's text; `delay_s` holds it."""

    status: int = 200
    error: str = ""
    message: str = ""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def throttled() -> Reply:
    return Reply(400, "ThrottlingException", "Rate exceeded")


def server_error() -> Reply:
    return Reply(500, "ServiceFailureException", "An unknown condition has caused a failure.")


def refused(error: str = "InvalidSsmlException", message: str = "Invalid SSML request") -> Reply:
    return Reply(400, error, message)


def held(delay_s: float) -> Reply:
    """Synthesise, but only after `delay_s` (a kill -9 test kills the worker meanwhile)."""
    return Reply(delay_s=delay_s)


class FakePolly(LocalServer):
    def __init__(self, key_id: str = KEY_ID) -> None:
        super().__init__()
        self.key_id = key_id
        self.queue: deque[Reply] = deque()
        self.texts: list[str] = []  # the text of every request synthesised, in order
        self.bodies: list[dict[str, Any]] = []  # every well-formed request body

    def script(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    @property
    def calls(self) -> int:
        return sum(1 for r in self.requests if r.path == SPEECH_PATH)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(SPEECH_PATH, self._speech)

    async def _speech(self, request: web.Request) -> web.Response:
        match = _CREDENTIAL.search(request.headers.get("Authorization", ""))
        if match is None or match[1] != self.key_id:
            return _error(403, "UnrecognizedClientException",
                          "The security token included in the request is invalid.")  # fmt: skip
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "SerializationException", "body is not JSON")
        missing = [k for k in ("OutputFormat", "Text", "VoiceId") if not body.get(k)]
        if missing:
            return _error(400, "ValidationException", f"missing: {', '.join(missing)}")
        self.bodies.append(body)
        reply = self.queue.popleft() if self.queue else Reply()
        await self.pause(reply.delay_s)
        if reply.status != 200:
            return _error(reply.status, reply.error, reply.message)
        text = str(body["Text"])
        if len(text) > MAX_CHARACTERS:
            return _error(400, "TextLengthExceededException",
                          f"Maximum text length has been exceeded: {len(text)}")  # fmt: skip
        self.texts.append(text)
        return web.Response(
            body=silent_frames(len(text), sample_rate=int(body.get("SampleRate") or 24000)),
            headers={"Content-Type": "audio/mpeg", "x-amzn-RequestCharacters": str(len(text))},
        )


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message}, status=status, headers={"x-amzn-ErrorType": f"{error}:"}
    )
