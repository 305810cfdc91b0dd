"""A processor's handler called the way the runtime calls it, across attempts, without BullMQ."""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from loguru import logger

from worker.context import JobContext
from worker.contract import Contract
from worker.keys import rate_key
from worker.registry import ProcessorSpec

CONTRACT = Contract.load()


class ProcessorJob:
    """One job across attempts: payload and result checked against the contract, as the
    Dispatcher does, and its resumable state in Redis under a key of its own."""

    def __init__(self, spec: ProcessorSpec, redis: aioredis.Redis, data: dict[str, Any]) -> None:
        self.spec = spec
        self.redis = redis
        self.data = data
        self.id = f"{spec.name}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:5]}"
        self.state_key = f"bull:test-{spec.name}-{uuid.uuid4().hex[:8]}:{self.id}:py-state"
        self.progress: list[int] = []
        self.attempts = 0

    async def attempt(self, attempt: int | None = None, max_attempts: int = 3) -> dict[str, Any]:
        """Run once; `attempt` defaults to the next one (a RateLimited requeue passes the same)."""
        self.attempts = attempt or self.attempts + 1
        self.progress = []

        async def record(value: int | dict[str, Any]) -> None:
            assert isinstance(value, int)
            self.progress.append(value)

        ctx = JobContext(
            job_id=self.id,
            name=self.spec.name,
            attempt=self.attempts,
            max_attempts=max_attempts,
            progress=record,
            log=logger.bind(job_id=self.id),
            redis=self.redis,
            state_key=self.state_key,
        )
        data = copy.deepcopy(self.data)
        CONTRACT.validate_payload(self.spec.name, data)
        result = await self.spec.run(data, ctx)
        CONTRACT.validate_result(self.spec.name, result)
        assert isinstance(result, dict)
        return result

    async def state(self) -> dict[str, Any]:
        raw = await self.redis.hgetall(self.state_key)
        return {k: json.loads(v) for k, v in raw.items()}


async def lift_openai_cooldown(redis: aioredis.Redis, env: dict[str, str]) -> None:
    """As if a 429's Retry-After had passed: the cooldown it left for every replica expires."""
    shared = env["PROTECTION_KEY_PREFIX"]
    await redis.delete(rate_key(shared, "openai", "gpt-4o-mini", "cooldown"))
