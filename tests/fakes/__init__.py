"""Local HTTP servers that speak third-party APIs (OpenAI, Supabase PostgREST) for tests.

Each server is an async context manager bound to 127.0.0.1 on a free port, records every
request it gets, and is driven by the real client packages pointed at its URL:

    async with FakeOpenAI() as openai_fake, FakePostgrest() as db:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": openai_fake.base_url,
               "SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key}

The servers live in `tests.fakes.openai_server` and `tests.fakes.postgrest_server`; the
shared base below imports neither, so they can import it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, else the raw text ("" when empty)
    raw: bytes = field(repr=False, default=b"")
    at: float = field(default_factory=time.monotonic)  # when it arrived, for spacing checks

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)


class LocalServer:
    """An aiohttp app on 127.0.0.1:<free port>; subclasses add routes in `routes()`."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        # Set at stop, so handlers that sleep to cause a client timeout end at once.
        self._closing = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Self:
        app = web.Application(middlewares=[self._record])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def pause(self, delay_s: float) -> None:
        """Wait `delay_s`, or less if the server is stopping."""
        if delay_s > 0:
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=delay_s)
            except TimeoutError:
                pass

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text else ""
        except ValueError:
            body = text
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=list(request.query.items()),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                raw=raw,
            )
        )
        response: web.StreamResponse = await handler(request)
        return response


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON reply with the status, body and headers given (None → no body; bytes sent as is)."""
    headers = dict(headers or {})
    if body is None:
        return web.Response(status=status, headers=headers)
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json; charset=utf-8"
    payload = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return web.Response(status=status, body=payload, headers=headers)
