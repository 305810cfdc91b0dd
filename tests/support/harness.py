"""Run the real service in-process against a test queue, with test processors if wanted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from worker.contract import Contract
from worker.registry import ProcessorSpec, Registry
from worker.service import Service
from worker.settings import Settings


def unique_queue(tag: str) -> str:
    return f"test-{tag}-{uuid.uuid4().hex[:10]}"


def settings_for(redis_url: str, queue: str, **overrides: Any) -> Settings:
    env = {"REDIS_URL": redis_url, "WORKER_QUEUE": queue, "WORKER_HEALTH_PORT": "0"}
    env.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(env)


def registry_of(*specs: ProcessorSpec, with_defaults: bool = True) -> Registry:
    from processors import build_registry

    registry = build_registry({}, ["ping"]) if with_defaults else Registry()
    for spec in specs:
        registry.register(spec)
    return registry


@asynccontextmanager
async def running_service(
    settings: Settings, registry: Registry | None = None
) -> AsyncIterator[Service]:
    service = Service(settings, registry or registry_of(), Contract.load())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def run_until_idle(
    settings: Settings, registry: Registry | None = None, timeout: float = 60.0
) -> Service:
    """Burst mode: the service's loop runs the queue empty and returns (no polling)."""
    service = Service(settings, registry or registry_of(), Contract.load())
    await asyncio.wait_for(service.run_until_idle(), timeout)
    return service


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy; fail with the last value on timeout."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s; last value: {last!r}")
