"""Jobs from the Node producer (bullmq 5.61 and 6.7) through the real service, read via getJob."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import math
import time
from typing import Any

from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from worker.context import JobContext
from worker.registry import ProcessorSpec

NESTED = {
    "text": 'Grüße, 日本語, emoji 😀, quote " backslash \\ newline \n',
    "list": [1, 2.5, None, True, {"deep": [{"deeper": "ñ"}]}],
    "empty": {},
}


def recorder() -> tuple[list[dict[str, Any]], ProcessorSpec]:
    runs: list[dict[str, Any]] = []

    async def echo(payload: dict[str, Any], ctx: JobContext) -> Any:
        runs.append({"id": ctx.job_id, "attempt": ctx.attempt, "at": time.monotonic()})
        await ctx.progress(42)
        return payload.get("result", NESTED)

    return runs, ProcessorSpec("echo", echo)


async def test_round_trip_of_nested_and_non_ascii_results(
    node: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    runs, spec = recorder()
    async with running_service(settings_for(redis_url, queue_name), registry_of(spec)):
        added = await node.add(queue_name, "echo", {"result": NESTED})
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
    assert job["state"] == "completed"
    assert job["returnvalue"] == NESTED
    assert job["progress"] == 42
    assert job["attemptsMade"] == 1
    # Stored exactly as Node's JSON.stringify writes it: raw UTF-8, no \\u escapes.
    raw = await rclient.hget(f"bull:{queue_name}:{added['id']}", "returnvalue")
    assert "日本語" in raw and "\\u" not in raw
    assert len(runs) == 1


async def test_ping_answers_with_the_worker_identity(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)) as service:
        added = await node.add(queue_name, "ping", {"echo": {"hello": "wörld"}})
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
    assert job["state"] == "completed", job
    result = job["returnvalue"]
    assert result["pong"] is True and result["echo"] == {"hello": "wörld"}
    assert result["jobId"] == added["id"]
    assert result["worker"]["workerId"] == service.worker.id
    assert job["progress"] == 100


async def test_unknown_job_type_fails_at_once(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)):
        added = await node.add(queue_name, "translate-everything", {"x": 1})
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
    assert job["state"] == "failed"
    assert job["failedReason"] == "Unknown job type: translate-everything"
    assert job["attemptsMade"] == 1


async def test_invalid_payload_fails_at_once_naming_the_field(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)):
        added = await node.add(queue_name, "ping", {"sleepMs": "soon"})
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
    assert job["state"] == "failed"
    assert job["attemptsMade"] == 1
    assert "sleepMs" in job["failedReason"], job["failedReason"]


async def test_idempotency_entry_is_what_node_expects(
    node: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    key = f"idempotency:echo:{queue_name}"
    result = {"success": True, "cards": ["día", "😀"], "n": 3}
    _, spec = recorder()
    try:
        async with running_service(settings_for(redis_url, queue_name), registry_of(spec)):
            added = await node.add(
                queue_name, "echo", {"result": result}, opts={"idempotencyKey": key}
            )
            job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
        assert job["state"] == "completed"
        entry = await node.idempotency(key)
        assert entry is not None
        assert list(entry["parsed"]) == ["jobId", "result", "cachedAt"]
        assert entry["parsed"]["jobId"] == added["id"]
        assert entry["parsed"]["result"] == result
        assert isinstance(entry["parsed"]["cachedAt"], int)
        assert abs(entry["parsed"]["cachedAt"] - time.time() * 1000) < 60_000
        assert entry["raw"] == entry["restringified"]
        ttl = await rclient.ttl(key)
        assert 86_000 < ttl <= 86_400
    finally:
        await rclient.delete(key)


async def test_retries_follow_the_jobs_backoff(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    starts: list[float] = []

    async def flaky(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        starts.append(time.monotonic())
        if ctx.attempt < payload["succeedOn"]:
            raise RuntimeError(f"boom on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}

    spec = ProcessorSpec("flaky", flaky)
    async with running_service(settings_for(redis_url, queue_name), registry_of(spec)):
        ok = await node.add(queue_name, "flaky", {"succeedOn": 3})
        done = await node.wait_finished(queue_name, ok["id"], timeout_ms=30000)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        starts.clear()
        bad = await node.add(queue_name, "flaky", {"succeedOn": 99})
        failed = await node.wait_finished(queue_name, bad["id"], timeout_ms=30000)
    assert done["state"] == "completed" and done["returnvalue"] == {"attempt": 3}
    assert done["attemptsMade"] == 3
    # Exponential from 2 s: 2 s then 4 s (generous upper slack for a loaded machine).
    assert 1.9 <= gaps[0] <= 3.5 and 3.9 <= gaps[1] <= 5.5, gaps
    assert failed["state"] == "failed" and failed["attemptsMade"] == 3
    assert failed["failedReason"] == "boom on attempt 3"


async def test_priority_order_lower_number_first(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    order: list[int] = []

    async def record(payload: dict[str, Any], ctx: JobContext) -> None:
        order.append(payload["p"])

    ids = []
    for p in (10, 5, 1, 10, 1, 5):
        ids.append((await node.add(queue_name, "rec", {"p": p}, opts={"priority": p}))["id"])
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=1)
    async with running_service(settings, registry_of(ProcessorSpec("rec", record))):
        for job_id in ids:
            await node.wait_finished(queue_name, job_id, timeout_ms=15000)
    assert order == [1, 1, 5, 5, 10, 10]


async def test_peak_concurrency_is_exactly_three(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    active = 0
    peak = 0

    async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.4)
        active -= 1

    async with running_service(
        settings_for(redis_url, queue_name), registry_of(ProcessorSpec("slow", slow))
    ) as service:
        added = await node.add_bulk(queue_name, [{"name": "slow", "data": {}} for _ in range(9)])
        for job_id in added["ids"]:
            await node.wait_finished(queue_name, job_id, timeout_ms=20000)
        health = service.health.health_body()
    assert peak == 3
    assert health["stats"]["peakConcurrency"] == 3
    assert health["stats"]["processed"] == 9


async def test_results_that_are_not_json_are_handled_once(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    calls = {"nan": 0, "when": 0}

    async def weird(payload: dict[str, Any], ctx: JobContext) -> Any:
        calls[payload["kind"]] += 1
        if payload["kind"] == "nan":
            return {"score": math.nan}
        return {"at": dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)}

    async with running_service(
        settings_for(redis_url, queue_name), registry_of(ProcessorSpec("weird", weird))
    ):
        nan = await node.add(queue_name, "weird", {"kind": "nan"})
        when = await node.add(queue_name, "weird", {"kind": "when"})
        nan_job = await node.wait_finished(queue_name, nan["id"], timeout_ms=15000)
        when_job = await node.wait_finished(queue_name, when["id"], timeout_ms=15000)
    assert when_job["state"] == "completed"
    assert when_job["returnvalue"] == {"at": "2026-11-28T12:00:00.000Z"}
    assert nan_job["state"] == "failed" and nan_job["attemptsMade"] == 1
    assert "score" in nan_job["failedReason"]
    assert calls == {"nan": 1, "when": 1}  # the work was not re-run


async def test_rate_limited_job_goes_back_without_using_an_attempt(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    from worker.errors import RateLimited

    runs: list[float] = []

    async def limited(payload: dict[str, Any], ctx: JobContext) -> dict[str, int]:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RateLimited(1.5, "429 from upstream")
        return {"runs": len(runs)}

    async with running_service(
        settings_for(redis_url, queue_name), registry_of(ProcessorSpec("limited", limited))
    ) as service:
        added = await node6.add(queue_name, "limited", {})
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=20000)
        requeued = service.stats.requeued
    assert job["state"] == "completed" and job["returnvalue"] == {"runs": 2}
    assert job["attemptsMade"] == 1  # the 429 did not use one of the 3 attempts
    assert runs[1] - runs[0] >= 1.4  # the queue waited out the Retry-After
    assert requeued == 1


async def test_stats_count_jobs_not_attempts(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async def outcome(payload: dict[str, Any], ctx: JobContext) -> None:
        if payload["fail"]:
            raise RuntimeError("always")

    async with running_service(
        settings_for(redis_url, queue_name), registry_of(ProcessorSpec("outcome", outcome))
    ) as service:
        ok = await node6.add(queue_name, "outcome", {"fail": False})
        bad = await node6.add(
            queue_name,
            "outcome",
            {"fail": True},
            opts={"attempts": 2, "backoff": {"type": "fixed", "delay": 100}},
        )
        await node6.wait_finished(queue_name, ok["id"], timeout_ms=15000)
        await node6.wait_finished(queue_name, bad["id"], timeout_ms=15000)
        stats = await eventually(
            lambda: _if(service.health.health_body()["stats"], lambda s: s["processed"] == 2)
        )
    assert stats == {
        "processed": 2, "succeeded": 1, "failed": 1, "currentlyProcessing": 0,
        "peakConcurrency": stats["peakConcurrency"], "successRate": "50.0%",
    }  # fmt: skip
    assert service.stats.retried == 1


async def _if(value: Any, pred: Any) -> Any:
    return value if pred(value) else None


async def test_a_lone_surrogate_in_a_payload_completes_as_with_a_node_worker(
    node: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    # Valid JSON (`"a\udc00b"`) that a Node worker completes; it has no UTF-8 form raw.
    async with running_service(settings_for(redis_url, queue_name)):
        added = await node.add(queue_name, "ping", {"echo": "a\udc00b"})
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
    assert job["state"] == "completed" and job["attemptsMade"] == 1, job
    assert job["returnvalue"]["echo"] == "a\udc00b"
    raw = await rclient.hget(f"bull:{queue_name}:{added['id']}", "returnvalue")
    assert '"echo":"a\\udc00b"' in raw  # escaped, as JSON.stringify writes it


async def test_a_null_payload_fails_at_once_as_not_an_object(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    from worker.protocol import QueueClient

    producer = QueueClient(settings_for(redis_url, queue_name))
    try:
        job_id = await producer.add("ping", None, {"attempts": 3})  # data stored as `null`
    finally:
        await producer.close()
    async with running_service(settings_for(redis_url, queue_name)):
        job = await node6.wait_finished(queue_name, job_id, timeout_ms=15000)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert job["failedReason"] == "Invalid payload for ping: (payload): expected object, got null"
