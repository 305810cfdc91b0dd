"""The Node bridge enqueues and reads jobs back the way the web service does, on bullmq 5 and 6."""

from __future__ import annotations

import os
import re
import uuid

import pytest
import redis.asyncio as aioredis

from tests.support.node_bridge import NodeBridge

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
EXPECTED_VERSIONS = {"5": "5.61.0", "6": "6.7.0"}


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", ["5", "6"])
async def test_add_read_back_count_obliterate(version: str) -> None:
    queue = f"test-bridge-{uuid.uuid4()}"
    name = "generate-flashcards"
    key = f"idempotency:{name}:{uuid.uuid4().hex}"
    data = {"content": "Cardiology – the heart", "subject": "Medicine", "topic": "AI Selection"}

    bridge = await NodeBridge.start(version, REDIS_URL)
    try:
        assert bridge.bullmq_version == EXPECTED_VERSIONS[version]
        added = await bridge.add(queue, name, data, {"idempotencyKey": key})
        assert re.fullmatch(rf"{re.escape(name)}-\d{{13}}-[0-9a-z]{{4,6}}", added["id"])
        assert isinstance(added["addedAt"], int)

        job = await bridge.get_job(queue, added["id"])
        assert job is not None
        assert job["id"] == added["id"]
        assert job["name"] == name
        assert job["data"] == data
        assert job["state"] == "waiting"
        assert job["opts"]["idempotencyKey"] == key
        assert job["opts"]["attempts"] == 3
        assert job["opts"]["backoff"] == {"type": "exponential", "delay": 2000}
        assert job["attemptsMade"] == 0

        counts = await bridge.counts(queue)
        assert counts["waiting"] == 1
        assert counts["total"] == 1

        assert await bridge.idempotency(key) is None
        assert await bridge.get_job(queue, "no-such-job") is None
    finally:
        await bridge.obliterate(queue)
        await bridge.aclose()

    client = aioredis.from_url(REDIS_URL)
    try:
        assert [key async for key in client.scan_iter(match=f"bull:{queue}:*")] == []
    finally:
        await client.aclose()
