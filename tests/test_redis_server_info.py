"""What the server is and how it keeps keys (issue 17, items 5 and 6): an evicting Redis is
one clear line at start-up and a failing `check`; a job whose hash vanished fails saying so;
the server is named as it names itself (Redis, Valkey, Redict)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import redis
from loguru import logger

from tests.support.harness import run_until_idle, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from tests.support.redis_server import private_redis
from worker.protocol import MISSING_DATA, UndecodableJob, decode_job
from worker.redis_probe import server_identity


@pytest.fixture(scope="module")
def evicting_url() -> Iterator[str]:
    with private_redis(args=("--maxmemory-policy", "allkeys-lru")) as url:
        yield url


async def test_an_evicting_redis_fails_check_saying_how_to_fix_it(
    evicting_url: str, queue_name: str
) -> None:
    env = {"REDIS_URL": evicting_url, "WORKER_QUEUE": queue_name, "WORKER_JOB_TYPES": "ping"}
    proc = await WorkerProcess.start(env, "check")
    code = await proc.wait(timeout=60)
    assert code == 1 and "NOT fit to run" in proc.output, proc.output
    assert "[FAIL] Redis maxmemory-policy is allkeys-lru: when Redis fills up it deletes keys" in (
        proc.output
    )
    assert "CONFIG SET maxmemory-policy noeviction" in proc.output


async def test_an_evicting_redis_is_one_line_at_start_up(
    evicting_url: str, queue_name: str
) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    try:
        with warnings.catch_warnings(record=True) as raw:
            warnings.simplefilter("always")
            async with running_service(settings_for(evicting_url, queue_name)):
                pass
    finally:
        logger.remove(sink)
    about = [line for line in lines if "maxmemory-policy" in line]
    assert len(about) == 1 and "CONFIG SET maxmemory-policy noeviction" in about[0], about
    assert not [w for w in raw if "viction" in str(w.message)]  # no raw Python warning


async def test_a_job_whose_hash_vanished_fails_saying_its_data_is_missing(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    added = await node6.add(queue_name, "ping", {"echo": 1})
    with redis.Redis.from_url(redis_url) as client:
        assert client.delete(f"bull:{queue_name}:{added['id']}") == 1  # as eviction would
    await run_until_idle(settings_for(redis_url, queue_name))
    job = await node6.get_job(queue_name, added["id"])
    assert job is not None and job["state"] == "failed", job
    assert job["failedReason"] == MISSING_DATA and job["attemptsMade"] == 1


def test_a_hash_moveToActive_recreated_reads_as_missing_data() -> None:
    job = decode_job({"processedOn": "1700000000000", "ats": "1"}, "7", "tok")
    assert isinstance(job, UndecodableJob) and job.reason.startswith("Job data is missing")
    assert not isinstance(decode_job({"name": "ping", "data": "{}"}, "7", "tok"), UndecodableJob)


@pytest.mark.parametrize(
    ("info", "said"),
    [
        ({"redis_version": "7.0.15"}, "Redis 7.0.15"),
        (
            {"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "8.0.2"},
            "Valkey 8.0.2",
        ),
        ({"redis_version": "7.2.4", "redict_version": "7.3.0"}, "Redict 7.3.0"),
        ({"redis_version": "7.2.4", "server_name": "keydb", "keydb_version": "6.3"}, "Keydb 6.3"),
    ],
)
def test_the_server_is_named_as_it_names_itself(info: dict[str, str], said: str) -> None:
    assert server_identity(info) == said


async def test_check_names_the_server_and_its_version(redis_url: str, queue_name: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        version = client.info("server")["redis_version"]
    env = {"REDIS_URL": redis_url, "WORKER_QUEUE": queue_name, "WORKER_JOB_TYPES": "ping"}
    proc = await WorkerProcess.start(env, "check")
    assert await proc.wait(timeout=60) == 0, proc.output
    assert f"[  ok] redis answers: Redis {version}" in proc.output, proc.output
