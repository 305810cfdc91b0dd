"""Redis Cluster (issue 17, item 4): three local masters, the Node producer on ioredis `Cluster`,
the queue's slot migrated to another master while jobs run."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from tests.support.harness import registry_of, running_service, settings_for, unique_queue
from tests.support.node_bridge import NodeBridge
from tests.support.redis_server import migrate_slot, private_cluster, slot_owner
from worker.context import JobContext
from worker.errors import ConfigError
from worker.registry import ProcessorSpec
from worker.settings import Settings

PREFIX = "{bull}"


@pytest.fixture(scope="session")
def cluster_urls() -> Iterator[list[str]]:
    with private_cluster(3) as urls:
        yield urls


@pytest.fixture(scope="module")
async def cluster_node(cluster_urls: list[str]) -> AsyncIterator[NodeBridge]:
    """The web service's producer as it would reach a cluster: ioredis `Cluster`, one seed."""
    bridge = await NodeBridge.start("6", cluster_urls[0], env={"REDIS_CLUSTER": "true"})
    yield bridge
    await bridge.aclose()


def slot_of(urls: list[str], key: str) -> int:
    with redis.Redis.from_url(urls[0]) as r:
        return int(r.execute_command("CLUSTER", "KEYSLOT", key))


async def test_jobs_survive_the_migration_of_the_queues_slot(
    cluster_urls: list[str], cluster_node: NodeBridge
) -> None:
    """Every job once, while the slot of `{bull}` moves to another master mid-run: the
    commands follow MOVED/ASK/TRYAGAIN, the blocking wait finds the new owner (the second
    batch arrives after the move, with every slot waiting on the marker)."""
    queue = unique_queue("cluster")
    slot = slot_of(cluster_urls, f"{PREFIX}:{queue}:marker")
    owner = slot_owner(cluster_urls, slot)
    seed = next(url for url in cluster_urls if url != owner)  # a node that does not own it
    target = next(url for url in cluster_urls if url not in (owner, seed))
    runs: Counter[int] = Counter()
    mid_run = asyncio.Event()

    async def count(payload: dict[str, Any], ctx: JobContext) -> dict[str, int]:
        runs[payload["n"]] += 1
        if sum(runs.values()) >= 60:
            mid_run.set()
        await asyncio.sleep(0.005)
        return {"n": payload["n"]}

    settings = settings_for(
        seed, queue, REDIS_CLUSTER="true", WORKER_PREFIX=PREFIX, WORKER_CONCURRENCY=4,
        WORKER_LIMITER_MAX=0,
    )  # fmt: skip
    opts = {"removeOnComplete": False, "attempts": 1}

    def batch(first: int, n: int) -> list[dict[str, Any]]:
        return [{"name": "count", "data": {"n": i}, "opts": opts} for i in range(first, first + n)]

    started = time.monotonic()
    async with running_service(settings, registry_of(ProcessorSpec("count", count))) as service:
        assert service.worker is not None and service.worker.protocol.cluster
        ids = (await cluster_node.add_bulk(queue, batch(0, 300), prefix=PREFIX))["ids"]
        await asyncio.wait_for(mid_run.wait(), 20)  # mid-run: jobs done, active, waiting
        moved = await asyncio.to_thread(migrate_slot, cluster_urls, slot, target)
        assert slot_owner(cluster_urls, slot) == target and moved > 0
        before = sum(runs.values())
        assert before < 300, "the migration came too late to be mid-run"
        await asyncio.sleep(0.5)  # every slot back in its blocking wait, now on the new owner
        ids += (await cluster_node.add_bulk(queue, batch(300, 100), prefix=PREFIX))["ids"]
        for job_id in ids:
            job = await cluster_node.wait_finished(queue, job_id, 20_000, prefix=PREFIX)
            assert job["state"] == "completed", job
        host, port = target.removeprefix("redis://").split(":")
        assert service.worker.protocol._blocking_at == (host, int(port))  # the wait moved too
    elapsed = time.monotonic() - started
    assert sorted(runs) == list(range(400)) and set(runs.values()) == {1}, runs.most_common(3)
    print(f"cluster: 400 jobs, {moved} keys migrated after {before} ran, {elapsed:.1f} s")
    await cluster_node.obliterate(queue, prefix=PREFIX)


async def test_a_cluster_found_at_start_up_refuses_a_prefix_without_a_hash_tag(
    cluster_urls: list[str],
) -> None:
    settings = settings_for(cluster_urls[0], unique_queue("cluster-untagged"))  # prefix "bull"
    with pytest.raises(ConfigError) as caught:
        async with running_service(settings):
            pass
    message = str(caught.value)
    assert message.startswith("WORKER_PREFIX: 'bull' has no hash tag"), message
    assert "INFO cluster_enabled:1" in message and "WORKER_PREFIX={bull}" in message, message


def test_redis_cluster_true_refuses_a_prefix_without_a_hash_tag() -> None:
    for prefix in ("bull", "{}bull", "bull{"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"REDIS_CLUSTER": "true", "WORKER_PREFIX": prefix})
        assert str(caught.value).startswith(f"WORKER_PREFIX: {prefix!r} has no hash tag")
    for prefix in ("{bull}", "{ai}:jobs", "x{y}"):
        settings = Settings.from_env({"REDIS_CLUSTER": "true", "WORKER_PREFIX": prefix})
        assert settings.redis.cluster
    with pytest.raises(ConfigError, match="REDIS_CLUSTER: a cluster has database 0 only"):
        Settings.from_env(
            {"REDIS_CLUSTER": "true", "WORKER_PREFIX": PREFIX, "REDIS_URL": "redis://h:1/2"}
        )
