"""A local server speaking Azure AI Vision Image Analysis 4.0's REST API, for `process-image`.

`POST /computervision/imageanalysis:analyze?api-version=...&features=read` with the key in
`Ocp-Apim-Subscription-Key` and `{"url": ...}` as the body (or the image's bytes as
`application/octet-stream`), answered like the service does:
`{"modelVersion", "metadata", "readResult": {"blocks": [{"lines": [{"text",
"boundingPolygon", "words": [{"text", "boundingPolygon", "confidence"}]}]}]}}`, or an error
`{"error": {"code", "message", "innererror"?}}` (with `Retry-After` on a 429). The real
`azure-ai-vision-imageanalysis` SDK, given `origin` as its endpoint, runs against it unmodified.

Each request takes the next scripted reply; an empty script reads the image as `lines`.
A wrong key is answered 401 whatever the script says.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import LocalServer

ANALYZE_PATH = "/computervision/imageanalysis:analyze"
KEY = "azure-vision-test-key"


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def read_result(*lines: str) -> Reply:
    """A 200 whose readResult has one block with `lines`, words split at spaces."""
    out = []
    for i, text in enumerate(lines):
        y = 10 + 30 * i
        box = [
            {"x": 10, "y": y},
            {"x": 200, "y": y},
            {"x": 200, "y": y + 20},
            {"x": 10, "y": y + 20},
        ]
        words = [{"text": w, "boundingPolygon": box, "confidence": 0.99} for w in text.split()]
        out.append({"text": text, "boundingPolygon": box, "words": words})
    body = {
        "modelVersion": "2023-10-01",
        "metadata": {"width": 640, "height": 480},
        "readResult": {"blocks": [{"lines": out}] if out else []},
    }
    return Reply(200, body)


def error(status: int, code: str, message: str, inner: str | None = None, **headers: str) -> Reply:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if inner:
        body["error"]["innererror"] = {"code": inner, "message": message}
    return Reply(status, body, headers)


def rate_limited(retry_after_s: int = 1) -> Reply:
    return error(429, "429", f"Rate limit is exceeded. Try again in {retry_after_s} seconds.",
                 **{"Retry-After": str(retry_after_s)})  # fmt: skip


def server_error(status: int = 500) -> Reply:
    return error(status, "InternalServerError", "An unexpected error occurred.")


def image_too_large() -> Reply:
    return error(400, "InvalidRequest", "The image size is not allowed to be zero or larger than "
                 "20971520 bytes.", inner="InvalidImageSize")  # fmt: skip


def unreadable_image() -> Reply:
    return error(400, "InvalidRequest", "Image format is not valid.", inner="InvalidImageFormat")


class FakeAzureVision(LocalServer):
    def __init__(self, key: str = KEY) -> None:
        super().__init__()
        self.key = key
        self.queue: deque[Reply] = deque()

    def script(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    @property
    def calls(self) -> int:
        return sum(1 for r in self.requests if r.path == ANALYZE_PATH)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(ANALYZE_PATH, self._analyze)

    async def _analyze(self, request: web.Request) -> web.Response:
        if request.headers.get("Ocp-Apim-Subscription-Key") != self.key:
            reply = error(401, "401", "Access denied due to invalid subscription key or wrong API "
                          "endpoint. Make sure to provide a valid key for an active subscription "
                          "and use a correct regional API endpoint for your resource.")  # fmt: skip
        elif "read" not in request.query.get("features", "").split(",") or not request.query.get(
            "api-version"
        ):
            reply = error(400, "InvalidRequest", "features=read and api-version are required")
        elif request.content_type == "application/octet-stream":
            # the image itself in the body (the SDK's analyze(image_data=...))
            body = await request.read()
            if not body:
                reply = error(400, "InvalidRequest", "The image data is empty")
            else:
                reply = self.queue.popleft() if self.queue else read_result("Hello", "World")
        else:
            try:
                url = json.loads(await request.read()).get("url")
            except ValueError:
                url = None
            if not isinstance(url, str):
                reply = error(400, "InvalidRequest", "Invalid request body: url is required")
            else:
                reply = self.queue.popleft() if self.queue else read_result("Hello", "World")
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)
