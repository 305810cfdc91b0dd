"""Several queues in one service (WORKER_QUEUES), or one service per queue: settings, the loops,
/health, /metrics, stats and shutdown over every queue consumed (issue 15, item 1)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import (
    eventually,
    registry_of,
    running_service,
    settings_for,
    unique_queue,
)
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from worker.context import JobContext
from worker.errors import ConfigError, ConfigErrors
from worker.registry import ProcessorSpec
from worker.service import Service
from worker.settings import QueueSettings, Settings, queue_variable, unread_variables


@pytest.fixture
async def other_queue(rclient: aioredis.Redis) -> AsyncIterator[str]:
    """A second queue of the test's own, cleaned up like `queue_name`."""
    name = unique_queue("other")
    yield name
    async for key in rclient.scan_iter(match=f"bull:{name}:*", count=500):
        await rclient.delete(key)


def two_queues(redis_url: str, first: str, second: str, **env: Any) -> Settings:
    return settings_for(
        redis_url, first, WORKER_QUEUES=f"{first},{second}", WORKER_LIMITER_MAX=0, **env
    )


async def http(port: int, path: str) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return await (response.text() if path == "/metrics" else response.json())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name` with these labels in a /metrics body."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def holding() -> tuple[asyncio.Event, ProcessorSpec]:
    """A `hold` job type whose jobs run until the event is set."""
    gate = asyncio.Event()

    async def hold(payload: dict[str, Any], ctx: JobContext) -> dict[str, bool]:
        await gate.wait()
        return {"held": True}

    return gate, ProcessorSpec("hold", hold)


def test_one_queue_by_default_as_before() -> None:
    s = Settings.from_env({})
    assert s.consumed == (QueueSettings("ai-jobs", 3, 10, 1000),)
    assert Settings.from_env({"WORKER_QUEUE": "q"}).consumed == (QueueSettings("q", 3, 10, 1000),)


def test_each_queue_has_its_settings_else_the_unsuffixed_ones() -> None:
    s = Settings.from_env(
        {
            "WORKER_QUEUES": " ai-jobs , audio-jobs ", "WORKER_CONCURRENCY": "4",
            "WORKER_LIMITER_MAX": "20", "WORKER_CONCURRENCY_AUDIO_JOBS": "2",
            "WORKER_LIMITER_MAX_AUDIO_JOBS": "0", "WORKER_LIMITER_DURATION_MS_AI_JOBS": "500",
        }
    )  # fmt: skip
    assert s.consumed == (
        QueueSettings("ai-jobs", 4, 20, 500),
        QueueSettings("audio-jobs", 2, 0, 1000),
    )
    assert (s.queue, s.concurrency, s.limiter) == ("ai-jobs", 4, {"max": 20, "duration": 500})
    audio = s.for_queue(s.consumed[1])
    assert (audio.queue, audio.concurrency, audio.limiter, audio.consumed) == (
        "audio-jobs", 2, None, (s.consumed[1],),
    )  # fmt: skip
    assert s.for_queue_named("audio-jobs") == audio  # the CLI's --queue, as the service sees it
    other = s.for_queue_named("elsewhere")  # a queue not consumed: these settings' own figures
    assert (other.queue, other.concurrency, other.consumed[0].name) == ("elsewhere", 4, "elsewhere")
    # One service per queue: the other queue's service lists it alone.
    alone = Settings.from_env({"WORKER_QUEUES": "audio-jobs", "WORKER_CONCURRENCY_AUDIO_JOBS": "5"})
    assert alone.consumed == (QueueSettings("audio-jobs", 5, 10, 1000),)
    assert alone.queue == "audio-jobs"
    assert queue_variable("WORKER_CONCURRENCY", "test.q-1") == "WORKER_CONCURRENCY_TEST_Q_1"
    # Per-queue variables are settings, not typos.
    assert unread_variables({"WORKER_CONCURRENCY_AUDIO_JOBS": "2"}) == []


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"WORKER_QUEUES": "ai-jobs,,audio-jobs"}, "WORKER_QUEUES", "an empty queue name"),
        ({"WORKER_QUEUES": "ai-jobs,audio-jobs,ai-jobs"}, "WORKER_QUEUES", "listed twice"),
        ({"WORKER_QUEUES": "audio-jobs,audio_jobs"}, "WORKER_QUEUES", "would share"),
        ({"WORKER_QUEUES": "bull:x"}, "WORKER_QUEUES", "contains ':'"),
        ({"WORKER_QUEUES": "audio-jobs", "WORKER_QUEUE": "ai-jobs"}, "WORKER_QUEUE", "not among"),
        ({"WORKER_CONCURRENCY_AUDIO_JOBS": "2"}, "WORKER_CONCURRENCY_AUDIO_JOBS", "not consume"),
        (
            {"WORKER_QUEUES": "a,b", "WORKER_LIMITER_MAX_C": "1"},
            "WORKER_LIMITER_MAX_C",
            "known here: WORKER_LIMITER_MAX_A, WORKER_LIMITER_MAX_B",
        ),
        ({"WORKER_QUEUES": "a,b", "WORKER_CONCURRENCY_B": "0"}, "WORKER_CONCURRENCY_B", "at least"),
        (
            {"WORKER_QUEUES": "a,b", "WORKER_LIMITER_DURATION_MS_A": "soon"},
            "WORKER_LIMITER_DURATION_MS_A",
            "whole number",
        ),
    ],
)
def test_bad_queue_settings_are_refused_naming_the_variable(
    env: dict[str, str], variable: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert not isinstance(caught.value, ConfigErrors)
    assert caught.value.variable == variable, str(caught.value)
    assert says in str(caught.value)


async def test_one_service_consumes_two_queues_each_with_its_concurrency(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    first, second = queue_name, other_queue
    gate, hold = holding()
    settings = two_queues(
        redis_url, first, second, WORKER_CONCURRENCY=2, WORKER_NAME="both",
        **{queue_variable("WORKER_CONCURRENCY", second): 1},
    )  # fmt: skip
    async with running_service(settings, registry_of(hold)) as service:
        port = service.health.port if service.health else 0
        # One registry for every queue: a job type is served on whichever queue it arrives.
        pings = {q: (await node6.add(q, "ping", {"echo": q}))["id"] for q in (first, second)}
        for queue, job_id in pings.items():
            job = await node6.wait_finished(queue, job_id)
            assert job["state"] == "completed" and job["returnvalue"]["echo"] == queue, job
        held = {q: [(await node6.add(q, "hold", {}))["id"] for _ in range(3)] for q in pings}

        async def slots_full() -> bool:
            return [len(service.workers[q].in_flight()) for q in pings] == [2, 1]

        await eventually(slots_full)
        health = await http(port, "/health")
        metrics = await http(port, "/metrics")
        workers = {q: await node6.get_workers(q) for q in pings}
        gate.set()
        for queue, ids in held.items():
            for job_id in ids:
                assert (await node6.wait_finished(queue, job_id))["state"] == "completed"
        done_health = await http(port, "/health")
        done_metrics = await http(port, "/metrics")
    # /health: the seed's keys and totals over both queues, then each queue's own.
    assert list(health)[:7] == [
        "status", "service", "uptime", "uptimeMinutes", "stats", "timestamp", "pid",
    ]  # fmt: skip
    assert health["stats"]["currentlyProcessing"] == 3 and health["stats"]["processed"] == 2
    assert [health["queues"][q]["currentlyProcessing"] for q in pings] == [2, 1]
    assert done_health["stats"]["processed"] == done_health["stats"]["succeeded"] == 8
    assert done_health["stats"]["peakConcurrency"] == 3
    assert [done_health["queues"][q]["processed"] for q in pings] == [4, 4]
    assert [done_health["queues"][q]["peakConcurrency"] for q in pings] == [2, 1]
    # /metrics: every per-queue series carries its queue; the queue gauges of both.
    for queue, running, waiting in ((first, 2, 1), (second, 1, 2)):
        assert sample(metrics, "worker_jobs_in_flight", queue=queue) == running
        assert sample(metrics, "worker_queue_jobs", queue=queue, state="waiting") == waiting
        assert sample(metrics, "worker_redis_up", queue=queue) == 1
        assert sample(metrics, "worker_queue_paused", queue=queue) == 0
        for job_type, count in (("ping", 1), ("hold", 3)):
            labels = {"queue": queue, "job_type": job_type}
            assert sample(done_metrics, "worker_jobs_total", outcome="completed", **labels) == count
            assert sample(done_metrics, "worker_job_duration_seconds_count", **labels) == count
    # getWorkers() of each queue lists this worker (its blocking connection on that queue).
    for queue in pings:
        assert [w["rawname"].endswith(":w:both") for w in workers[queue]] == [True], workers


async def test_each_queue_has_its_own_limiter(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    limited, free = queue_name, other_queue
    settings = two_queues(
        redis_url, limited, free, WORKER_CONCURRENCY=3,
        **{queue_variable("WORKER_LIMITER_MAX", limited): 1,
           queue_variable("WORKER_LIMITER_DURATION_MS", limited): 1000},
    )  # fmt: skip
    async with running_service(settings):
        slow = (await node6.add_bulk(limited, [{"name": "ping", "data": {}}] * 2))["ids"]
        fast = (await node6.add_bulk(free, [{"name": "ping", "data": {}}] * 20))["ids"]
        slow_jobs = [await node6.wait_finished(limited, i) for i in slow]
        fast_jobs = [await node6.wait_finished(free, i) for i in fast]
    starts = sorted(job["processedOn"] for job in slow_jobs)
    assert starts[1] - starts[0] >= 900, starts  # one job per second on the limited queue
    # ... while the other queue, without a limiter, ran all of its jobs meanwhile.
    assert max(job["finishedOn"] for job in fast_jobs) < starts[1], (fast_jobs, starts)


async def test_stop_hands_back_the_running_jobs_of_every_queue(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    _, hold = holding()  # never released: the jobs run until the deadline
    settings = two_queues(redis_url, queue_name, other_queue, WORKER_SHUTDOWN_GRACE_S=0.2)
    service = Service(settings, registry_of(hold), _contract())
    await service.start()
    try:
        ids = {q: (await node6.add(q, "hold", {}))["id"] for q in (queue_name, other_queue)}

        async def both_running() -> bool:
            return all(service.workers[q].in_flight() == [i] for q, i in ids.items())

        await eventually(both_running)
    finally:
        await service.stop()
    for queue, job_id in ids.items():
        job = await node6.get_job(queue, job_id)
        assert job is not None and job["state"] == "waiting" and job["attemptsMade"] == 0, job
        assert service.workers[queue].deadline_hit


async def test_one_service_per_queue(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    # WORKER_QUEUES=<one queue> on each of two services: each takes its own queue's jobs only.
    alone = {q: settings_for(redis_url, q, WORKER_QUEUES=q) for q in (queue_name, other_queue)}
    async with (
        running_service(alone[queue_name]) as one,
        running_service(alone[other_queue]) as two,
    ):
        for queue in alone:
            ids = (await node6.add_bulk(queue, [{"name": "ping", "data": {}}] * 3))["ids"]
            for job_id in ids:
                assert (await node6.wait_finished(queue, job_id))["state"] == "completed"
        assert (one.stats.processed, two.stats.processed) == (3, 3)
        assert list(one.workers) == [queue_name] and list(two.workers) == [other_queue]


async def test_two_queues_in_the_real_process_crash_restart_and_sigterm(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    # A replica with a stable identity, killed while a job runs on each queue and started
    # again: it takes both back at once (crash reclaim on every queue); then SIGTERM.
    env = {
        "REDIS_URL": redis_url, "WORKER_QUEUES": f"{queue_name},{other_queue}",
        "WORKER_HEALTH_PORT": "0", "WORKER_JOB_TYPES": "ping", "RAILWAY_REPLICA_ID": "r1",
        queue_variable("WORKER_CONCURRENCY", other_queue): "2",
    }  # fmt: skip
    first = await WorkerProcess.start(env)
    again: WorkerProcess | None = None
    try:
        await first.wait_for_line("waiting for jobs")
        ids = {
            q: (await node6.add(q, "ping", {"sleepMs": 800}))["id"]
            for q in (queue_name, other_queue)
        }
        for job_id in ids.values():
            await first.wait_for_line(f"Job picked up: {job_id}")
        await first.kill()
        again = await WorkerProcess.start(env)
        jobs = {q: await node6.wait_finished(q, i, timeout_ms=15_000) for q, i in ids.items()}
        await again.wait_for_line(f"Took back 1 job.*{ids[queue_name]}")
        await again.wait_for_line(f"Took back 1 job.*{ids[other_queue]}")
        again.proc.send_signal(signal.SIGTERM)
        assert await again.wait(timeout=20) == 0
    finally:
        await first.kill()
        if again is not None:
            await again.kill()
    for job in jobs.values():
        assert job["state"] == "completed" and job["stalledCounter"] == 0, job
    out = again.output
    for line in (
        f"Queue: {queue_name} | concurrency 3 | limiter 10 jobs per 1000 ms (queue-wide)",
        f"Queue: {other_queue} | concurrency 2 | limiter 10 jobs per 1000 ms (queue-wide)",
        "Concurrency: 5 jobs in parallel", "WORKER STATISTICS", "Processed: 2",
        f"Queue {queue_name}: processed 1", f"Queue {other_queue}: processed 1",
    ):  # fmt: skip
        assert line in out, out


async def test_bad_worker_queues_stop_start_up_naming_the_variable() -> None:
    proc = await WorkerProcess.start(
        {"WORKER_QUEUES": "ai-jobs,ai-jobs", "WORKER_HEALTH_PORT": "0"}
    )
    assert await proc.wait(timeout=20) == 2
    assert "Configuration error: WORKER_QUEUES: queue 'ai-jobs' is listed twice" in proc.output


def _contract() -> Any:
    from worker.contract import Contract

    return Contract.load()


async def test_stats_shows_every_queue_consumed_or_the_one_asked_for(
    node6: NodeBridge, redis_url: str, queue_name: str, other_queue: str
) -> None:
    env = {"REDIS_URL": redis_url, "WORKER_QUEUES": f"{queue_name},{other_queue}"}
    await node6.add(other_queue, "ping", {})
    both = await WorkerProcess.start(env, "stats")
    assert await both.wait() == 0, both.output
    added = await WorkerProcess.start(env, "enqueue", "ping", "--queue", other_queue)
    assert await added.wait() == 0, added.output
    one = await WorkerProcess.start(env, "stats", "--queue", other_queue)
    assert await one.wait() == 0, one.output
    answers = [json.loads(line) for line in both.lines]
    assert [(a["stats"]["queue"], a["stats"]["waiting"]) for a in answers] == [
        (queue_name, 0), (other_queue, 1),
    ]  # fmt: skip
    assert [json.loads(line)["stats"]["waiting"] for line in one.lines] == [2]
