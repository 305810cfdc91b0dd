"""url_fetch.download: redirect failures are permanent and never show a presigned signature."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from processors.shared import url_fetch
from tests.fakes import LocalServer
from worker.errors import PermanentJobError

SIGNATURE = "X-Amz-Signature=c0ffee5ecret"


class Redirects(LocalServer):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/loop", self._loop)
        app.router.add_get("/elsewhere", self._elsewhere)

    async def _loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/loop?{SIGNATURE}&n={len(self.requests)}")

    async def _elsewhere(self, request: web.Request) -> web.Response:
        # No host: an invalid URL (written raw; web.HTTPFound would refuse it).
        return web.Response(status=302, headers={"Location": f"http://:0/a.wav?{SIGNATURE}"})


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Redirects]:
    server = await Redirects().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("path", "error"), [("/loop", "TooManyRedirects"), ("/elsewhere", "InvalidUrlRedirect")]
)
async def test_a_bad_redirect_fails_for_good_without_the_signature(
    server: Redirects, path: str, error: str
) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(PermanentJobError) as failed:
            await url_fetch.download(session, f"{server.origin}{path}?{SIGNATURE}", 1000, "audio")
    message = str(failed.value)
    assert message.startswith(f"Could not download the audio from {server.origin}{path}: "), message
    assert error in message
    shown = "".join(traceback.format_exception(failed.value))  # what a stack trace would hold
    assert "c0ffee5ecret" not in message and "c0ffee5ecret" not in shown
