"""generate-flashcards end to end: the Node producer, the real service and BullMQ, local OpenAI
and PostgREST stand-ins. Counts OpenAI calls and BullMQ attempts per error class."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from processors import generate_flashcards as gf
from tests.fakes.fixtures import stand_ins, users_table
from tests.fakes.openai_server import (
    FakeOpenAI,
    completion,
    insufficient_quota,
    rate_limited,
    server_error,
)
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.harness import running_service, settings_for
from tests.support.node_bridge import NodeBridge
from worker.contract import Contract
from worker.registry import Registry

USER_ID = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"
CONTRACT = Contract.load()
CARDS = {
    "flashcards": [
        {
            "front": term, "back": f"{term} (es)", "topic": "Cardiology", "difficulty": "beginner",
            "example": f"The {term} is important.", "pronunciation": f"/{term}/",
        }
        for term in ("heart", "valve", "artery", "vein", "pulse", "rhythm", "atrium", "ventricle",
                     "aorta", "murmur")
    ]
}  # fmt: skip


def payload(content: str) -> dict[str, Any]:
    return {
        "content": content, "subject": "Medicine", "topic": "Cardiology",
        "userId": USER_ID, "nativeLanguage": "Spanish", "targetLanguage": "English",
    }  # fmt: skip


class World:
    def __init__(self, openai: FakeOpenAI, db: FakePostgrest, queue: str) -> None:
        self.openai = openai
        self.db = db
        self.queue = queue


@pytest.fixture
async def world(redis_url: str, queue_name: str) -> AsyncIterator[World]:
    async with stand_ins(users_table(USER_ID)) as fakes:
        registry = Registry()
        registry.register(gf.build(fakes.env))
        async with running_service(settings_for(redis_url, queue_name), registry):
            yield World(fakes.openai, fakes.db, queue_name)


async def test_completes_then_answers_the_same_payload_from_the_cache(
    world: World, node: NodeBridge, rclient: aioredis.Redis
) -> None:
    world.openai.script(completion(CARDS, prompt_tokens=900, completion_tokens=600))
    data = payload(f"Cardiology basics {time.time()}: heart, valves, arteries and veins.")
    first = await node.web_enqueue(world.queue, gf.JOB_NAME, data)
    try:
        assert first["cached"] is False
        job = await node.wait_finished(world.queue, first["id"], timeout_ms=20000)
        assert job["state"] == "completed", job
        assert job["progress"] == 100 and job["attemptsMade"] == 1
        result = job["returnvalue"]
        assert (await node.validate("result", gf.JOB_NAME, result))["valid"]
        assert result["tokenUsage"] == 1500 and len(result["flashcards"]) == 10
        second = await node.web_enqueue(world.queue, gf.JOB_NAME, data)
        assert second == {
            "cached": True,
            "jobId": first["id"],
            "result": result,
            "key": first["key"],
        }
        assert world.openai.calls == 1  # once in all
        counts = await node.counts(world.queue)
        assert counts["completed"] == 1 and counts["waiting"] == 0
        assert len(world.db.rpc_calls("increment_tokens")) == 1
    finally:
        await rclient.delete(first["key"])


async def test_rate_limit_pauses_the_queue_and_uses_no_attempt(
    world: World, node6: NodeBridge
) -> None:
    world.openai.script(rate_limited(retry_after_s=1), completion(CARDS))
    added = await node6.add(world.queue, gf.JOB_NAME, payload("Rate limited content, twice."))
    job = await node6.wait_finished(world.queue, added["id"], timeout_ms=30000)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1  # the 429 cost no attempt
    assert world.openai.calls == 2
    first, second = world.openai.chat_requests[:2]
    assert second.at - first.at >= 0.9  # the queue waited out Retry-After


@pytest.mark.slow
async def test_server_errors_are_retried_by_bullmq_with_backoff(
    world: World, node6: NodeBridge
) -> None:
    world.openai.script(server_error(500), server_error(502), completion(CARDS))
    added = await node6.add(world.queue, gf.JOB_NAME, payload("Flaky upstream content here."))
    job = await node6.wait_finished(world.queue, added["id"], timeout_ms=30000)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 3
    assert world.openai.calls == 3  # one call per attempt: the SDK does not retry on its own


async def test_insufficient_quota_fails_at_once(world: World, node6: NodeBridge) -> None:
    world.openai.script(insufficient_quota())
    added = await node6.add(world.queue, gf.JOB_NAME, payload("Quota content for the test."))
    job = await node6.wait_finished(world.queue, added["id"], timeout_ms=20000)
    assert job["state"] == "failed" and job["attemptsMade"] == 1
    assert world.openai.calls == 1
    assert "quota" in job["failedReason"].lower()
