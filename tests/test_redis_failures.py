"""Redis that keeps failing (issue 17, items 2 and 3): back off, say it once, exit non-zero in
the end; a read-only primary after a failover, and the worker reconnecting by itself."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
import redis
from loguru import logger

from tests.support.proc import WorkerProcess
from tests.support.redis_server import free_port, private_redis
from worker.backoff import CAP_S, SUMMARY_EVERY_S, RedisBackoff


async def ready(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/ready") as response:
            return response.status, await response.json()


# --- the backoff ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def said() -> Any:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    yield lines
    logger.remove(sink)


def test_pauses_grow_exponentially_capped_and_jittered(said: list[str]) -> None:
    clock = Clock()
    low = RedisBackoff(300, clock, jitter=lambda: 0.0)
    high = RedisBackoff(300, clock, jitter=lambda: 1.0)
    error = redis.ReadOnlyError("You can't write against a read only replica.")
    lows = [low.failed("fetch", error) for _ in range(8)]
    highs = [high.failed("fetch", error) for _ in range(8)]
    assert highs == [0.5, 1.0, 2.0, 4.0, 8.0, CAP_S, CAP_S, CAP_S]
    assert lows == [h / 2 for h in highs]  # jitter: between half and all of the pause
    # 16 failures, two lines: one per backoff (no line per attempt, no traceback).
    assert len(said) == 2 and said[0].startswith("Redis error in fetch: ReadOnlyError: You can't")


def test_one_summary_line_per_interval_then_one_line_when_it_answers(said: list[str]) -> None:
    clock = Clock()
    backoff = RedisBackoff(300, clock)
    for _ in range(100):  # 100 failures over 100 s
        backoff.failed("fetch", ConnectionError("refused"))
        clock.now += 1
    assert backoff.problem == "fetch failing for 100 s: ConnectionError: refused"
    assert len(said) == 1 + int(99 // SUMMARY_EVERY_S), said
    assert (
        said[1]
        == "Redis still failing in fetch for 30 s: 31 error(s), last: ConnectionError: refused"
    )
    backoff.succeeded("fetch")
    backoff.succeeded("fetch")
    assert said[-1] == "Redis answers again in fetch after 100.0 s (100 error(s))"
    assert backoff.problem is None and backoff.failed("fetch", OSError()) <= 0.5  # a new streak


def test_gives_up_after_continuous_failure_of_one_path_only() -> None:
    clock = Clock()
    backoff = RedisBackoff(60, clock)
    for _ in range(59):
        backoff.failed("fetch", OSError("down"))
        backoff.failed("renew locks", OSError("down"))
        backoff.succeeded("renew locks")  # another path's successes do not hide this one
        clock.now += 1
    assert backoff.gave_up is None
    clock.now += 1
    backoff.failed("fetch", OSError("down"))
    assert backoff.gave_up is not None
    assert "60 s in fetch (WORKER_REDIS_GIVE_UP_S=60): OSError: down" in backoff.gave_up


# --- the real process ---------------------------------------------------------------------------


async def test_a_read_only_redis_backs_off_fails_ready_and_exits_1() -> None:
    """The server turns into a replica of a primary that is gone: every write is refused."""
    with private_redis() as url:
        port = free_port()
        env = {"REDIS_URL": url, "WORKER_QUEUE": "give-up", "WORKER_JOB_TYPES": "ping",
               "WORKER_HEALTH_PORT": str(port), "WORKER_REDIS_GIVE_UP_S": "4",
               "WORKER_CONCURRENCY": "8", "WORKER_SHUTDOWN_GRACE_S": "1"}  # fmt: skip
        proc = await WorkerProcess.start(env)
        try:
            await proc.wait_for_line("waiting for jobs")
            assert (await ready(port))[0] == 200
            with redis.Redis.from_url(url) as client:
                client.replicaof("127.0.0.1", str(free_port()))
            await proc.wait_for_line("Redis error in fetch")
            status, body = await ready(port)
            assert status == 503, body
            assert re.match(r"redis: fetch failing for \d+ s: ", body["reason"]), body
            code = await proc.wait(timeout=30)
        finally:
            await proc.kill()
    out = proc.output
    assert code == 1, out
    assert "Stopping so the platform restarts the worker: Redis failed without a break" in out
    assert "Traceback" not in out
    assert "Redis error in fetch: ReadOnlyError: You can't write against a read only" in out
    # 8 slots, ~4 s: a line per error would be dozens (29 a second were measured before).
    noise = [line for line in proc.lines if "Redis error in" in line or "still failing" in line]
    assert 1 <= len(noise) <= 6, "\n".join(noise)


async def test_after_a_failover_the_worker_reconnects_and_resumes_by_itself(
    queue_name: str,
) -> None:
    """The worker reaches Redis by one address (a proxy, as a DNS name or a virtual IP). At the
    failover the replica is promoted, the old primary demoted (it refuses writes) and the
    address moved to the new primary: only connections made again reach it."""
    from tests.support.harness import eventually, running_service, settings_for
    from tests.support.node_bridge import NodeBridge
    from tests.support.tcp_proxy import SwitchableProxy

    with private_redis() as url_a:
        port_a = int(url_a.rsplit(":", 1)[1])
        with private_redis(args=("--replicaof", "127.0.0.1", str(port_a))) as url_b:
            port_b = int(url_b.rsplit(":", 1)[1])
            a, b = redis.Redis.from_url(url_a), redis.Redis.from_url(url_b)
            proxy = await SwitchableProxy(port_a).start()
            address = f"redis://127.0.0.1:{proxy.port}"
            try:
                settings = settings_for(address, queue_name, WORKER_CONCURRENCY=4)
                async with running_service(settings) as service:
                    assert service.health is not None
                    port = service.health.port
                    async with await NodeBridge.start("6", url_a) as node:
                        first = await node.add(queue_name, "ping", {"echo": 1})
                        job = await node.wait_finished(queue_name, first["id"])
                        assert job["state"] == "completed"

                    b.replicaof("NO", "ONE")  # the failover: B is the primary,
                    a.replicaof("127.0.0.1", str(port_b))  # A its read-only replica,
                    _, body = await eventually(lambda: _ready_if(port, 503), timeout=15)
                    assert body["reason"].startswith("redis: fetch failing"), body
                    proxy.switch(port_b)  # and the address now leads to B

                    await eventually(lambda: _ready_if(port, 200), timeout=30)
                    async with await NodeBridge.start("6", url_b) as node:
                        second = await node.add(queue_name, "ping", {"echo": 2})
                        job = await node.wait_finished(queue_name, second["id"], 20_000)
                    assert job["state"] == "completed" and job["returnvalue"]["echo"] == 2
            finally:
                await proxy.aclose()
                a.close()
                b.close()


async def _ready_if(port: int, status: int) -> tuple[int, dict[str, Any]] | None:
    answer = await ready(port)
    return answer if answer[0] == status else None


def test_what_counts_as_a_failover() -> None:
    from worker.protocol import is_failover

    assert is_failover(redis.ReadOnlyError("You can't write against a read only replica."))
    assert is_failover(redis.BusyLoadingError("Redis is loading the dataset in memory"))
    assert is_failover(redis.ResponseError("MASTERDOWN Link with MASTER is down"))
    assert is_failover(redis.ResponseError("UNBLOCKED force unblock from blocking operation"))
    assert not is_failover(redis.ResponseError("ERR unknown command"))
    assert not is_failover(redis.ConnectionError("refused"))  # redis-py reconnects by itself
