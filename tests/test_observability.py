"""What the tools operators already use read from this worker, read the way they read it: Node
bullmq's own `queue.getWorkers()`, `getJobLogs()`, `getMetrics()` and `getJob()` (5.61 and 6.x),
which are what Bull Board and Taskforce call (issue 13)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from worker.context import JobContext
from worker.registry import ProcessorSpec


async def test_get_workers_lists_the_running_worker_once(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    assert await node.get_workers(queue_name) == []
    async with running_service(settings_for(redis_url, queue_name)):
        workers = await node.get_workers(queue_name)
        # Idle (blocked on the marker) and busy alike: the same one connection is listed.
        await node.add(queue_name, "ping", {})
        busy = await node.get_workers(queue_name)
    assert [w["name"] for w in workers] == [queue_name]
    assert busy == workers
    assert await node.get_workers(queue_name) == []  # gone with the worker


async def test_get_workers_shows_the_name_as_for_a_named_node_worker(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    await node.start_worker(queue_name, name="node-1")
    try:
        settings = settings_for(redis_url, queue_name, WORKER_NAME="py-1")
        async with running_service(settings):
            workers = await node.get_workers(queue_name)
    finally:
        await node.stop_worker(queue_name)
    raw = sorted(w["rawname"] for w in workers)
    assert len(raw) == 2, workers
    node_raw, py_raw = raw
    assert node_raw.endswith(":w:node-1") and py_raw.endswith(":w:py-1")
    assert node_raw.removesuffix("node-1") == py_raw.removesuffix("py-1")  # same form as Node's


async def _wait_listed(node: NodeBridge, queue: str, count: int) -> list[dict[str, str]]:
    async def listed() -> list[dict[str, str]] | None:
        workers = await node.get_workers(queue)
        return workers if len(workers) == count else None

    result: list[dict[str, str]] = await eventually(listed, timeout=10)
    return result


async def test_a_worker_whose_connection_dropped_is_listed_again(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    async with running_service(settings_for(redis_url, queue_name, WORKER_NAME="py-2")):
        (before,) = await _wait_listed(node6, queue_name, 1)
        clients = await rclient.client_list()
        (mine,) = [c for c in clients if c.get("name") == before["rawname"]]
        await rclient.client_kill_filter(_id=mine["id"])
        await asyncio.sleep(0.2)
        await node6.add(queue_name, "ping", {})
        (after,) = await _wait_listed(node6, queue_name, 1)
    assert after["rawname"] == before["rawname"]


async def test_completions_and_failures_reach_bullmqs_metrics_and_name_the_worker(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_NAME="py-metrics")
    async with running_service(settings):
        done = [await node.add(queue_name, "ping", {}) for _ in range(3)]
        bad = await node.add(queue_name, "no-such-type", {})
        jobs = [await node.wait_finished(queue_name, a["id"]) for a in [*done, bad]]
    assert [j["state"] for j in jobs] == ["completed"] * 3 + ["failed"]
    assert {j["processedBy"] for j in jobs} == {"py-metrics"}  # Job.processedBy, as Node sets it
    completed = await node.get_metrics(queue_name, "completed")
    failed = await node.get_metrics(queue_name, "failed")
    assert completed["meta"]["count"] == 3 and failed["meta"]["count"] == 1
    text = await node.export_prometheus_metrics(queue_name)
    assert f'bullmq_job_count{{queue="{queue_name}", state="completed"}} 3' in text


async def test_bullmq_metrics_can_be_turned_off(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_METRICS_MAX_DATA_POINTS=0)
    async with running_service(settings):
        added = await node6.add(queue_name, "ping", {})
        await node6.wait_finished(queue_name, added["id"])
    assert (await node6.get_metrics(queue_name, "completed"))["meta"]["count"] == 0


async def _broken_reply(payload: dict[str, Any], ctx: JobContext) -> Any:
    try:
        return json.loads("{ not json")  # library frames below ours
    except ValueError as exc:
        raise RuntimeError("OpenAI reply is not JSON") from exc


async def test_a_failed_attempt_stores_a_short_trace_reason_first(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    registry = registry_of(ProcessorSpec("broken", _broken_reply))
    async with running_service(settings_for(redis_url, queue_name), registry):
        added = await node.add(queue_name, "broken", {}, {"attempts": 2, "backoff": 0})
        job = await node.wait_finished(queue_name, added["id"])
    assert job["state"] == "failed" and job["attemptsMade"] == 2
    assert job["failedReason"] == "OpenAI reply is not JSON"
    assert len(job["stacktrace"]) == 2  # one entry per attempt, as Node keeps them
    for trace in job["stacktrace"]:
        lines = trace.splitlines()
        assert len(trace.encode()) <= 2048
        assert lines[0] == "RuntimeError: OpenAI reply is not JSON"
        assert lines[1].startswith("    at _broken_reply (tests/test_observability.py:")
        assert any(line.startswith("Caused by: JSONDecodeError: ") for line in lines)
        assert "Traceback" not in trace and "site-packages" not in trace
