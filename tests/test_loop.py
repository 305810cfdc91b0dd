"""The run loop's own guarantees: poison jobs fail at once, a job cannot hold a slot for ever,
stop() keeps its deadline with Redis gone, burst mode runs a queue empty."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from typing import Any

import pytest

from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.redis_server import private_redis
from worker.context import JobContext
from worker.contract import Contract
from worker.logs import flush_logs, setup_logging
from worker.registry import FinalFailure, ProcessorSpec
from worker.service import Service


def depth_of(payload: Any) -> int:
    depth = 0
    while isinstance(payload, dict) and "a" in payload:
        payload, depth = payload["a"], depth + 1
    return depth


async def measure(payload: dict[str, Any], ctx: JobContext) -> dict[str, int]:
    return {"depth": depth_of(payload)}


async def hang(payload: dict[str, Any], ctx: JobContext) -> None:
    await asyncio.sleep(3600)


def block(payload: dict[str, Any], ctx: JobContext) -> str:
    time.sleep(2)  # a sync handler runs in a thread: the slot is freed, the thread ends later
    return "late"


MEASURE = ProcessorSpec(name="measure", handler=measure)


# --- poison jobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("data", b"{not json", "data is not JSON"),
        ("data", b'{"text":"\xff\xfe"}', "data is not UTF-8"),
        ("opts", b"nope", "opts is not JSON"),
        ("timestamp", b"yesterday", "timestamp is not a number"),
    ],
)
async def test_a_job_that_cannot_be_decoded_fails_at_once_and_the_next_one_runs(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any,
    field: str, value: bytes, reason: str,
) -> None:  # fmt: skip
    poison = await node6.add(queue_name, "ping", {"echo": "poison"})
    fine = await node6.add(queue_name, "ping", {"echo": "fine"})
    await rclient.hset(f"bull:{queue_name}:{poison['id']}", field, value)
    key = f"bull:{queue_name}"
    async with running_service(settings_for(redis_url, queue_name)) as service:
        done = await node6.wait_finished(queue_name, fine["id"], timeout_ms=10_000)
        # Node's getJob cannot read such a job either: look at Redis directly.
        await eventually(lambda: rclient.zscore(f"{key}:failed", poison["id"]), timeout=10)
        stats = service.stats
    failed_reason, stalled = await rclient.hmget(f"{key}:{poison['id']}", "failedReason", "stc")
    assert failed_reason.startswith("Job data could not be decoded: ")
    assert reason in failed_reason
    assert stalled in (None, "0")  # failed by the worker, never left to stall
    assert await rclient.lrange(f"{key}:active", 0, -1) == []
    assert done["state"] == "completed" and done["returnvalue"]["echo"] == "fine"
    assert (stats.failed, stats.succeeded) == (1, 1)


async def test_data_nested_deeper_than_pythons_recursion_limit_is_processed(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    # What the web service's queue.add stores for such a payload (Python's json gives up near
    # 1,000 levels, JSON.parse does not); the bridge cannot carry it, so the field is written
    # directly and read back from Redis (JSON.stringify in the bridge stops near 5,000).
    depth = 3000
    added = await node6.add(queue_name, "measure", {})
    deep = '{"a":' * depth + "1" + "}" * depth
    key = f"bull:{queue_name}"
    await rclient.hset(f"{key}:{added['id']}", "data", deep)
    async with running_service(settings_for(redis_url, queue_name), registry_of(MEASURE)):
        await eventually(lambda: rclient.zscore(f"{key}:completed", added["id"]), timeout=10)
    assert await rclient.hget(f"{key}:{added['id']}", "returnvalue") == f'{{"depth":{depth}}}'


# --- job timeouts ------------------------------------------------------------------------------


async def test_a_job_past_its_timeout_fails_its_attempt_and_is_retried(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    registry = registry_of(ProcessorSpec(name="hang", handler=hang))
    settings = settings_for(redis_url, queue_name, WORKER_JOB_TIMEOUT_S=0.3, WORKER_CONCURRENCY=1)
    added = await node6.add(queue_name, "hang", {}, opts={"attempts": 2, "backoff": 0})
    after = await node6.add(queue_name, "ping", {"echo": "slot free"})
    started = time.monotonic()
    async with running_service(settings, registry) as service:
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=10_000)
        other = await node6.wait_finished(queue_name, after["id"], timeout_ms=10_000)
        renewing = service.worker.in_flight() if service.worker else None
    assert time.monotonic() - started < 8
    assert job["state"] == "failed" and job["attemptsMade"] == 2, job
    assert job["failedReason"] == "Job timed out after 0.3 s"
    assert other["state"] == "completed"  # the one slot was free again
    assert renewing == []  # no lock renewed for the cancelled handler
    # One stack per failed attempt, kept in the job as Node keeps them (`job.stacktrace`).
    stacks = json.loads(await rclient.hget(f"bull:{queue_name}:{added['id']}", "stacktrace"))
    assert len(stacks) == 2 and all("Job timed out after 0.3 s" in st for st in stacks), stacks


async def test_a_job_type_may_declare_a_shorter_timeout_and_sync_handlers_obey_it(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    registry = registry_of(ProcessorSpec(name="block", handler=block, timeout_s=0.2))
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=1)  # 600 s by default
    added = await node6.add(queue_name, "block", {})
    async with running_service(settings, registry):
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=10_000)
    assert job["state"] == "failed" and job["failedReason"] == "Job timed out after 0.2 s"


async def test_the_final_failure_hook_runs_once_and_its_own_failure_hides_nothing(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    told: list[FinalFailure] = []

    async def failed(failure: FinalFailure) -> None:
        told.append(failure)
        raise RuntimeError("Supabase is down")

    registry = registry_of(ProcessorSpec(name="hang", handler=hang, on_final_failure=failed))
    settings = settings_for(redis_url, queue_name, WORKER_JOB_TIMEOUT_S=0.3)
    added = await node6.add(queue_name, "hang", {"n": 1}, opts={"attempts": 2, "backoff": 0})
    async with running_service(settings, registry):
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=10_000)
    assert job["state"] == "failed" and job["attemptsMade"] == 2, job
    assert job["failedReason"] == "Job timed out after 0.3 s"
    (failure,) = told  # the last attempt only
    assert (failure.job_id, failure.payload) == (added["id"], {"n": 1})
    assert failure.reason == "Job timed out after 0.3 s"
    assert failure.state_key.endswith(f"{added['id']}:py-state")


# --- shutdown ----------------------------------------------------------------------------------


async def test_stop_keeps_its_deadline_when_redis_is_gone(queue_name: str) -> None:
    # Measured before: SIGTERM during a Redis outage took grace + 5 s per job in flight.
    from tests.support.node_bridge import NodeBridge as Bridge

    registry = registry_of(ProcessorSpec(name="hang", handler=hang))
    with private_redis() as url:
        node = await Bridge.start("6", url)
        try:
            settings = settings_for(url, queue_name, WORKER_CONCURRENCY=6,
                                    WORKER_SHUTDOWN_GRACE_S=1)  # fmt: skip
            service = Service(settings, registry, Contract.load())
            await service.start()
            await node.add_bulk(queue_name, [{"name": "hang", "data": {}}] * 6)
            assert service.worker is not None
            worker = service.worker
            await eventually(lambda: _running(worker, 6), timeout=10)
        finally:
            await node.aclose()
    # The private Redis is gone now: nothing can be handed back or closed cleanly.
    started = time.monotonic()
    await asyncio.wait_for(service.stop(), timeout=30)
    assert time.monotonic() - started < 1 + 5 + 2  # grace + the hard part + slack


async def _running(worker: Any, n: int) -> bool:
    return len(worker.in_flight()) == n


# --- burst -------------------------------------------------------------------------------------


async def test_run_until_idle_processes_the_backlog_and_returns(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    added = await node6.add_bulk(queue_name, [{"name": "ping", "data": {"echo": i}}
                                              for i in range(25)])  # fmt: skip
    service = Service(
        settings_for(redis_url, queue_name, WORKER_LIMITER_MAX=0), registry_of(), Contract.load()
    )
    await asyncio.wait_for(service.run_until_idle(), timeout=30)
    counts = await node6.counts(queue_name)
    assert counts["completed"] == len(added["ids"]) == 25 and counts["waiting"] == 0
    assert service.stats.succeeded == 25


# --- log lines about a job ---------------------------------------------------------------------


async def test_every_json_line_about_a_job_carries_its_attempt_and_names_it_once(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    poison = await node6.add(queue_name, "ping", {"echo": "poison"})
    fine = await node6.add(queue_name, "ping", {"echo": "fine"})
    await rclient.hset(f"bull:{queue_name}:{poison['id']}", "data", b"{not json")
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out)
    try:
        async with running_service(settings_for(redis_url, queue_name)):
            await node6.wait_finished(queue_name, fine["id"], timeout_ms=10_000)
            key = f"bull:{queue_name}:failed"
            await eventually(lambda: rclient.zscore(key, poison["id"]), timeout=10)
        flush_logs()  # lines are written by the sink's thread
    finally:
        setup_logging("text", "INFO")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    about_jobs = [r for r in records if r.get("job_id") in (poison["id"], fine["id"])]
    assert {r["job_id"] for r in about_jobs} == {poison["id"], fine["id"]}
    for record in about_jobs:
        assert record.get("attempt") == 1, record
        assert record["message"].count(record["job_id"]) <= 1, record
    info = [r["message"] for r in about_jobs if r["job_id"] == fine["id"] and r["level"] == "INFO"]
    assert len(info) == 2, info  # picked up, completed: the seed's words, one line each
    assert info[0].startswith(f"Job picked up: {fine['id']} (ping) | Attempt: 1/3 | ")
    assert re.search(r" \| Currently processing: \d jobs \| Started: \d{4}-", info[0]), info[0]
    assert info[1].startswith(f"Job completed: {fine['id']} in ")
