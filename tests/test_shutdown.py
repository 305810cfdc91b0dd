"""Graceful shutdown in-process: locks kept while draining, a deadline that loses nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from worker.context import JobContext
from worker.registry import ProcessorSpec
from worker.service import Service

pytestmark = pytest.mark.slow

FAST_LOCKS = {"WORKER_LOCK_DURATION_MS": 1000, "WORKER_STALLED_INTERVAL_MS": 1000}


def sleeper() -> tuple[list[str], ProcessorSpec]:
    runs: list[str] = []

    async def sleep(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        runs.append(ctx.job_id)
        await asyncio.sleep(payload["s"])
        return {"slept": payload["s"]}

    return runs, ProcessorSpec("sleep", sleep)


async def active(node: NodeBridge, queue: str, job_id: str) -> bool:
    job = await node.get_job(queue, job_id)
    return bool(job and job["state"] == "active")


async def test_in_flight_jobs_keep_their_locks_until_they_end(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # bullmq's close() stopped renewing locks when the first job ended: the long job lost its
    # 1 s lock and was left active, to be run again later.
    runs, spec = sleeper()
    settings = settings_for(redis_url, queue_name, **FAST_LOCKS, WORKER_SHUTDOWN_GRACE_S=20)
    service = Service(settings, registry_of(spec), _contract())
    await service.start()
    short = await node6.add(queue_name, "sleep", {"s": 0.3})
    long = await node6.add(queue_name, "sleep", {"s": 4})
    await eventually(lambda: active(node6, queue_name, long["id"]))
    await service.stop()
    for added in (short, long):
        job = await node6.get_job(queue_name, added["id"])
        assert job["state"] == "completed", job
        assert job["attemptsMade"] == 1 and job["stalledCounter"] == 0
    assert sorted(runs) == sorted([short["id"], long["id"]])


async def test_job_running_at_the_deadline_goes_back_without_using_an_attempt(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    runs, spec = sleeper()
    settings = settings_for(redis_url, queue_name, WORKER_SHUTDOWN_GRACE_S=1)
    service = Service(settings, registry_of(spec), _contract())
    await service.start()
    added = await node6.add(queue_name, "sleep", {"s": 8})
    await eventually(lambda: active(node6, queue_name, added["id"]))
    began = time.monotonic()
    await service.stop()
    assert time.monotonic() - began < 5
    job = await node6.get_job(queue_name, added["id"])
    assert job["state"] == "waiting", job
    assert job["attemptsMade"] == 0
    assert service.stats.requeued == 1
    # The next worker takes it at once and it completes on its first counted attempt.
    fast = ProcessorSpec("sleep", spec.handler)
    async with running_service(settings_for(redis_url, queue_name), registry_of(fast)):
        await node6.get_job(queue_name, added["id"])
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=20000)
    assert job["state"] == "completed" and job["attemptsMade"] == 1
    assert runs == [added["id"], added["id"]]


async def test_blocking_processor_runs_in_a_thread_and_only_once(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # A sync handler that blocks 3 s, with 1 s locks and a second worker watching for stalls:
    # on the event loop it would lose its lock and run twice.
    runs: list[str] = []

    def blocking(payload: dict[str, Any], ctx: JobContext) -> dict[str, bool]:
        runs.append(ctx.job_id)
        time.sleep(3)
        return {"done": True}

    spec = ProcessorSpec("blocking", blocking)
    settings = settings_for(redis_url, queue_name, **FAST_LOCKS, WORKER_CONCURRENCY=1)
    async with (
        running_service(settings, registry_of(spec)),
        running_service(settings, registry_of(ProcessorSpec("blocking", blocking))),
    ):
        added = await node6.add(queue_name, "blocking", {})
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=20000)
        await asyncio.sleep(2.5)  # room for a stalled re-run to show up
    assert job["state"] == "completed" and job["stalledCounter"] == 0
    assert runs == [added["id"]]


def _contract() -> Any:
    from worker.contract import Contract

    return Contract.load()


async def test_no_job_is_activated_once_shutdown_began(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # A fetch already past bullmq's pause check (e.g. a blocking wait that ends as a delayed
    # job falls due) used to activate a job that nobody ran: it sat `active` until stalled.
    service = Service(settings_for(redis_url, queue_name), registry_of(), _contract())
    await service.start()
    try:
        stopping = asyncio.ensure_future(service.worker.stop(5))
        await asyncio.sleep(0)  # shutdown has begun
        added = await node6.add(queue_name, "ping", {})
        assert await service.worker.next_job(f"{service.worker.id}:late") is None
        await stopping
        job = await node6.get_job(queue_name, added["id"])
        assert job["state"] == "waiting" and job["attemptsMade"] == 0
    finally:
        await service.stop()
