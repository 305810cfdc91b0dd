"""The per-job Redis path: a completion fetches the next job (as Node's worker does), commands
go over a small pool, and neither loses nor repeats a job when shutdown comes mid-stream."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.support.harness import (
    eventually,
    registry_of,
    run_until_idle,
    running_service,
    settings_for,
)
from tests.support.node_bridge import NodeBridge
from worker.context import JobContext
from worker.protocol import COMMAND_CONNECTIONS, QueueProtocol
from worker.registry import ProcessorSpec


def counting(runs: list[str], seconds: float = 0.0) -> ProcessorSpec:
    async def step(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        runs.append(ctx.job_id)
        await asyncio.sleep(seconds)
        return {"n": payload["n"]}

    return ProcessorSpec("step", step)


def jobs(n: int) -> list[dict[str, Any]]:
    return [{"name": "step", "data": {"n": i}} for i in range(n)]


async def test_a_completion_fetches_the_next_job(
    node6: NodeBridge,
    redis_url: str,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bullmq-python fetched each job with its own moveToActive after the completion; Node
    # fetches it with the completion. With a backlog, moveToActive is only each slot's first.
    activations: list[bool] = []
    original = QueueProtocol.move_to_active

    async def counted(self: QueueProtocol, token: str) -> Any:
        answer = await original(self, token)
        activations.append(answer.job is not None)
        return answer

    monkeypatch.setattr(QueueProtocol, "move_to_active", counted)
    added = await node6.add_bulk(queue_name, jobs(30))
    runs: list[str] = []
    # No limiter: each window's first fetch would be a moveToActive again (tested below).
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=3, WORKER_LIMITER_MAX=0)
    await run_until_idle(settings, registry_of(counting(runs)))
    assert (await node6.counts(queue_name))["completed"] == 30
    assert sorted(runs) == sorted(added["ids"])  # each once
    # 3 slots, each activated once by moveToActive; a slot may find the queue empty at the
    # very end and ask again. Without fetch-next this is 30.
    assert 3 <= activations.count(True) <= 6, activations


async def test_jobs_fetched_with_completions_obey_the_limiter(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # The completion's fetch checks the limiter in the same script: 5 per second holds.
    await node6.add_bulk(queue_name, jobs(15))
    runs: list[str] = []
    starts: list[float] = []
    spec = counting(runs)
    inner = spec.handler

    async def timed(payload: dict[str, Any], ctx: JobContext) -> Any:
        starts.append(asyncio.get_running_loop().time())
        return await inner(payload, ctx)

    settings = settings_for(
        redis_url, queue_name, WORKER_CONCURRENCY=3, WORKER_LIMITER_MAX=5,
        WORKER_LIMITER_DURATION_MS=1000,
    )  # fmt: skip
    await run_until_idle(settings, registry_of(ProcessorSpec("step", timed)))
    assert (await node6.counts(queue_name))["completed"] == 15
    starts.sort()
    most_in_a_window = max(
        sum(1 for t in starts if s <= t < s + 0.95) for s in starts
    )  # a window a little short of the limiter's, so clock jitter cannot add a job
    assert most_in_a_window <= 5, starts
    assert starts[-1] - starts[0] >= 1.8  # 15 jobs at 5 per window: at least 3 windows


@pytest.mark.slow
@pytest.mark.parametrize(("concurrency", "round_"), [(3, 0), (3, 1), (3, 2), (20, 0), (20, 2)])
async def test_stop_mid_stream_loses_and_repeats_nothing(
    node6: NodeBridge, redis_url: str, queue_name: str, concurrency: int, round_: int
) -> None:
    # Completions are fetching next jobs (and, at 20 slots, leave as batched pipelines) when
    # the stop comes: every job ends up completed once or waiting, never active, never run
    # twice; a second worker finishes the rest.
    added = await node6.add_bulk(queue_name, jobs(80))
    runs: list[str] = []
    settings = settings_for(
        redis_url, queue_name, WORKER_CONCURRENCY=concurrency, WORKER_LIMITER_MAX=0
    )
    async with running_service(settings, registry_of(counting(runs, 0.01 * (round_ + 1)))):

        async def started_enough() -> bool:
            return len(runs) >= 10 + 7 * round_

        await eventually(started_enough, timeout=20)
    counts = await node6.counts(queue_name)
    assert counts["active"] == 0, counts
    assert counts["completed"] == len(runs) and counts["waiting"] == 80 - len(runs), counts
    await run_until_idle(settings, registry_of(counting(runs)))
    assert (await node6.counts(queue_name))["completed"] == 80
    assert Counter(runs) == Counter(added["ids"])  # all 80, each exactly once


async def test_one_named_connection_per_worker(
    redis_url: str, queue_name: str, rclient: Any
) -> None:
    # Node names one connection per worker, and queue.getWorkers() lists CLIENT LIST names:
    # the command pool must not make one worker look like five.
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=8)
    async with running_service(settings) as service:
        assert service.worker is not None
        name = service.worker.protocol.client_name
        await eventually(lambda: _clients_named(rclient, name))  # the run loop has started
        conn = service.worker.protocol.redis
        await asyncio.gather(*(conn.blpop(f"{queue_name}:nothing", 0.2) for _ in range(8)))
        pool = conn.connection_pool
        assert pool.max_connections == COMMAND_CONNECTIONS
        assert len(pool._in_use_connections) + len(pool._available_connections) == 4
        clients = await _clients_named(rclient, name)
        assert len(clients) == 1, [c["cmd"] for c in clients]


async def _completed(node: NodeBridge, queue: str, n: int) -> bool:
    return (await node.counts(queue))["completed"] >= n


async def _clients_named(rclient: Any, name: str) -> list[dict[str, Any]]:
    return [c for c in await rclient.client_list() if c.get("name") == name]
