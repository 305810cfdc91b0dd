"""A local OpenAI for the flashcards benchmark: every chat completion is answered after `--delay-s`.

    python bench/openai_standin.py [--delay-s 1.0]

It is the test suite's FakeOpenAI (tests/fakes/openai_server.py: the real HTTP API shape and
headers) with an endless script: each request gets the same valid 12-card reply.
stdout: {"base_url": "http://127.0.0.1:PORT/v1"} once listening; it serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from tests.fakes.openai_server import (
    FakeOpenAI,
    Scripted,
    _scripted_response,
    completion,
)

TERMS = (
    "heart", "rhythm", "arrhythmia", "electrocardiogram", "pathology", "biopsy",
    "histology", "radiology", "ultrasound", "imaging", "disease", "cardiology",
)  # fmt: skip


def cards() -> list[dict[str, str]]:
    return [
        {
            "front": term,
            "back": f"{term} (es)",
            "topic": "Cardiology",
            "difficulty": ("beginner", "intermediate", "expert")[i % 3],
            "example": f"The {term} matters.",
            "pronunciation": f"/{term}/",
        }
        for i, term in enumerate(TERMS)
    ]


class EndlessOpenAI(FakeOpenAI):
    """Answers every chat completion with `reply` after its delay, and does nothing else.

    The strict-schema and content checks of FakeOpenAI are skipped: they cost the server
    milliseconds of CPU for requests that carry a json_schema (ours) and none for those that
    don't (the Node worker's), which would make the server slower for one side only.
    """

    def __init__(self, reply: Scripted) -> None:
        super().__init__()
        self.reply = reply

    async def _chat(self, request: web.Request) -> web.Response:
        self.requests.clear()  # recorded by the base middleware; nobody reads them here
        sent = json.loads(await request.read())
        await self.pause(self.reply.delay_s)
        return _scripted_response(self.reply, sent, self._next_id())


async def main(delay_s: float) -> None:
    reply: Any = completion({"flashcards": cards()}, delay_s=delay_s)
    async with EndlessOpenAI(reply) as server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-s", type=float, default=1.0)
    asyncio.run(main(parser.parse_args().delay_s))
