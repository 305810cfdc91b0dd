"""`ping`: echoes its payload and the worker's identity, to test a deployment end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from worker.context import JobContext
from worker.registry import ProcessorSpec

JOB_NAME = "ping"


async def ping(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    await ctx.progress(10)
    # An optional pause lets an operator watch a job in flight (and test a graceful drain).
    sleep_ms = int(payload.get("sleepMs", 0))
    if sleep_ms:
        ctx.log.info("ping sleeping {} ms", sleep_ms)
        await asyncio.sleep(sleep_ms / 1000)
    await ctx.progress(100)
    return {
        "pong": True,
        "echo": payload.get("echo"),
        "jobId": ctx.job_id,
        "attempt": ctx.attempt,
        "worker": dict(ctx.worker),
    }


def build(env: Mapping[str, str]) -> ProcessorSpec:
    return ProcessorSpec(
        name=JOB_NAME,
        handler=ping,
        description="echo the payload and the worker's identity",
    )
