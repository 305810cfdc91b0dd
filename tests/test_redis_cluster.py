"""Redis Cluster (issue 17, item 4): three local masters, the Node producer on ioredis `Cluster`,
the queue's slot migrated to another master while jobs run; provider protection (breaker,
limiter, budget holds) and an AI job type on the cluster; the CLI on the cluster."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from itertools import pairwise
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from processors import generate_flashcards as gf
from processors.shared.budget import Budget, OverBudget, TokenEstimate
from tests.fakes.fixtures import Tables, users_table
from tests.fakes.openai_server import FakeOpenAI, completion, server_error
from tests.support.harness import (
    eventually,
    registry_of,
    running_service,
    settings_for,
    unique_queue,
)
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from tests.support.protection import race_for_the_probe
from tests.support.redis_server import (
    add_replica,
    forget,
    free_port,
    migrate_slot,
    private_cluster,
    slot_owner,
    take_over,
)
from tests.support.redis_server import cluster_node as redis_cluster_node
from worker.context import JobContext
from worker.errors import ConfigError, Deferred, PermanentJobError, RetryableJobError
from worker.keys import budget_key
from worker.providers import OPENAI, Provider, ProviderSettings
from worker.registry import ProcessorSpec, Registry
from worker.settings import Settings

PREFIX = "{bull}"
USER_ID = "5b8e2f10-3c47-4d9a-a1e6-7f20c4d8b913"
CARD = {"front": "Heart", "back": "Corazón", "topic": "Cardiology", "difficulty": "beginner",
        "example": "The heart pumps blood.", "pronunciation": "/hɑːrt/"}  # fmt: skip


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


# --- provider protection on a cluster ------------------------------------------------------------


@pytest.fixture
def db_tables() -> Tables:
    return users_table(USER_ID)


@pytest.fixture
async def cluster(cluster_urls: list[str]) -> AsyncIterator[RedisCluster]:
    """What the service's processors get as `ctx.redis` on a cluster: the cluster client."""
    client = RedisCluster.from_url(cluster_urls[0], decode_responses=True)
    yield client
    await client.aclose()


async def web_status(redis: RedisCluster, prefix: str) -> dict[str, Any]:
    """The breaker as the web service reads it (INTEROP §8), key by key as ioredis `Cluster`
    must (they lie in different slots), a missing state meaning CLOSED."""
    fields = ("state", "failures", "successes", "opened_at")
    state, failures, successes, opened_at = [
        await redis.get(f"{prefix}circuit:openai:{field}") for field in fields
    ]
    return {"state": state or "CLOSED", "failures": int(failures or 0),
            "successes": int(successes or 0),
            "openedAt": int(opened_at) if opened_at else None}  # fmt: skip


CLOSED_AFRESH = {"state": "CLOSED", "failures": 0, "successes": 0, "openedAt": None}


async def test_the_breaker_decides_in_one_step_on_a_cluster_in_the_keys_the_web_reads(
    cluster: RedisCluster, cluster_urls: list[str]
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    env = {"PROTECTION_KEY_PREFIX": prefix, "OPENAI_BREAKER_FAILURES": "2",
           "OPENAI_BREAKER_SUCCESSES": "2", "OPENAI_BREAKER_OPEN_S": "1"}  # fmt: skip
    provider = Provider(ProviderSettings.from_env(OPENAI, env), "gpt-4o-mini")
    # The keys the web reads lie in several slots (no script may touch them all); ours lie in
    # the slot of the state key, the one the web service's status, alert and reset turn on.
    web_keys = provider.circuit_keys[:4]
    assert len({cluster.keyslot(key) for key in web_keys}) > 1
    state_slot = cluster.keyslot(web_keys[0])
    assert {cluster.keyslot(key) for key in provider.cluster_circuit_keys} == {state_slot}

    async def outcome(error: Exception | None) -> Any:
        async with provider.call(cluster) as permit:
            return await permit.succeeded() if error is None else await permit.failed(error)

    await outcome(PermanentJobError("400"))  # an answer: not a fault
    assert isinstance(await outcome(RetryableJobError("502")), RetryableJobError)
    assert (await web_status(cluster, prefix))["failures"] == 1
    opened = await outcome(RetryableJobError("503"))
    # (open 1 s: long enough that a loaded machine still asks while it is open)
    assert isinstance(opened, Deferred) and 0.5 < opened.delay_s <= 1.0
    status = await web_status(cluster, prefix)
    assert status["state"] == "OPEN" and status["failures"] == 2
    assert abs(status["openedAt"] - time.time() * 1000) < 2000
    with pytest.raises(Deferred, match="circuit breaker is open"):
        await provider.admit(cluster)

    # Open time over: replicas (two clients here) race, and exactly one call is the probe.
    await asyncio.sleep(opened.delay_s + 0.05)
    other = RedisCluster.from_url(cluster_urls[1], decode_responses=True)
    try:
        # Ready before the race, as the service's client is (connect): redis-py's async cluster
        # client used by 10 calls at once before its first initialize can fail one of them
        # ('NoneType' object has no attribute 'writelines'; seen 3 times in 27 runs).
        await other.initialize()
        probe = await race_for_the_probe(provider, cluster, other)
    finally:
        await other.aclose()
    assert (await web_status(cluster, prefix))["state"] == "HALF_OPEN"
    await probe.succeeded()
    assert (await web_status(cluster, prefix))["successes"] == 1
    await outcome(None)
    assert await web_status(cluster, prefix) == CLOSED_AFRESH

    # The web service's reset route, while open: it writes the state key, and ours starts
    # afresh (one fault counts 1, not the 3rd in a row); the counters it shows follow.
    await outcome(RetryableJobError("500"))
    await outcome(RetryableJobError("500"))
    assert (await web_status(cluster, prefix))["state"] == "OPEN"
    await cluster.set(f"{prefix}circuit:openai:state", "CLOSED")
    assert isinstance(await outcome(RetryableJobError("500")), RetryableJobError)
    assert await web_status(cluster, prefix) == {**CLOSED_AFRESH, "failures": 1}
    await outcome(None)
    assert await web_status(cluster, prefix) == CLOSED_AFRESH


async def test_a_hash_tagged_protection_prefix_keeps_each_script_in_one_slot(
    cluster: RedisCluster,
) -> None:
    prefix = f"{{t{uuid.uuid4().hex[:8]}}}:"  # a tag of its own, as a cluster operator may pick
    env = {"PROTECTION_KEY_PREFIX": prefix, "OPENAI_BREAKER_FAILURES": "1", "OPENAI_RPM": "60"}
    provider = Provider(ProviderSettings.from_env(OPENAI, env), "gpt-4o-mini")
    keys = [*provider.cluster_circuit_keys, *provider.cluster_rate_keys,
            *(key for pair in provider._copies for key in pair)]  # fmt: skip
    assert {cluster.keyslot(key) for key in keys} == {cluster.keyslot(prefix)}
    async with provider.call(cluster) as permit:  # the scripts run: no CROSSSLOT
        opened = await permit.failed(RetryableJobError("502"))
    assert isinstance(opened, Deferred)
    assert (await web_status(cluster, prefix))["state"] == "OPEN"


async def test_the_rate_limit_and_the_429_cooldown_on_a_cluster(cluster: RedisCluster) -> None:
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    # 4 requests per 2 s: calls 500 ms apart; a wait up to 2 s is held in the slot.
    env = {"PROTECTION_KEY_PREFIX": prefix, "OPENAI_RPM": "4", "OPENAI_RATE_WINDOW_S": "2"}
    provider = Provider(ProviderSettings.from_env(OPENAI, env), "gpt-4o-mini")
    assert len({cluster.keyslot(key) for key in provider.cluster_rate_keys}) == 1
    replies = [await provider.limiter(cluster, "acquire") for _ in range(6)]
    assert [ok for ok, _, _ in replies] == [True] * 5 + [False], replies
    waits = [wait for _, wait, _ in replies]
    # each waits 500 ms more than the one before, less the time between the two asks
    assert waits[0] == 0 and all(300 < b - a <= 501 for a, b in pairwise(waits[:5])), waits
    assert replies[5][2] == 1  # held back by the requests limit
    await provider.limiter(cluster, "cooldown", cooldown_s=5)
    ok, wait, why = await provider.limiter(cluster, "acquire")
    assert (ok, why) == (False, 3) and 4000 < wait <= 5001  # ms, rounded up
    requests, _, cooldown = provider.cluster_rate_keys  # no tokens limit set
    assert await cluster.exists(requests, cooldown) == 2
    assert sum([await cluster.exists(key) for key in provider.rate_keys]) == 0


async def test_budget_holds_are_one_atomic_step_on_a_cluster(
    cluster: RedisCluster, stand_in_env: dict[str, str], db: Any
) -> None:
    # $4.99 of $5.00 spent: room for two calls of $0.0036, not three.
    db.tables.update(users_table(USER_ID, input_tokens=8_316_667, output_tokens=0))
    budget = Budget.from_env(stand_in_env)
    estimate = TokenEstimate(1000, 1250)
    month = time.strftime("%Y-%m", time.gmtime())
    shared = stand_in_env["PROTECTION_KEY_PREFIX"]
    reserved, settled = (budget_key(shared, USER_ID, month, field, cluster=True)
                         for field in ("reserved", "settled"))  # fmt: skip
    assert cluster.keyslot(reserved) == cluster.keyslot(settled)
    try:
        tries = [budget.reserve(cluster, USER_ID, estimate) for _ in range(5)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        held = [r for r in results if not isinstance(r, BaseException)]
        assert len(held) == 2 and sum(isinstance(r, OverBudget) for r in results) == 3, results
        assert await cluster.zcard(reserved) == 2
        await held[0].settle(1000, 1250)  # one transaction, both keys in one slot
        assert (await cluster.zcard(reserved), await cluster.get(settled)) == (1, "3600")
        await held[1].release()
        assert await cluster.zcard(reserved) == 0
        assert await cluster.exists(budget_key(shared, USER_ID, month, "reserved")) == 0
    finally:
        await budget.aclose()


async def test_flashcards_through_an_outage_on_a_cluster_each_job_once(
    cluster_urls: list[str], cluster_node: NodeBridge, cluster: RedisCluster,
    openai_fake: FakeOpenAI, stand_in_env: dict[str, str], db: Any,
) -> None:  # fmt: skip
    """The AI job type end to end on the cluster: two 503s open the breaker, the jobs park
    instead of failing, one probe closes it; the limiter and the budget holds take part."""
    prefix, queue, jobs = stand_in_env["PROTECTION_KEY_PREFIX"], unique_queue("cluster-ai"), 3
    env = {**stand_in_env, "OPENAI_BREAKER_FAILURES": "2", "OPENAI_BREAKER_SUCCESSES": "1",
           "OPENAI_BREAKER_OPEN_S": "0.5", "OPENAI_RPM": "600"}  # fmt: skip
    openai_fake.script(server_error(503), server_error(503))
    openai_fake.fallback = lambda: completion({"flashcards": [CARD]})
    registry = Registry()
    registry.register(gf.build(env))
    settings = settings_for(cluster_urls[1], queue, WORKER_PREFIX=PREFIX, WORKER_CONCURRENCY=2)
    opts = {"attempts": 3, "backoff": {"type": "fixed", "delay": 100}}
    batch = [{"name": gf.JOB_NAME, "data": {"content": f"The heart pumps blood ({i}).",
              "subject": "Medicine", "topic": "Cardiology", "userId": USER_ID}, "opts": opts}
             for i in range(jobs)]  # fmt: skip
    async with running_service(settings, registry) as service:
        assert service.worker is not None and service.worker.protocol.cluster  # found by INFO
        ids = (await cluster_node.add_bulk(queue, batch, prefix=PREFIX))["ids"]

        async def open_now() -> bool:
            return (await web_status(cluster, prefix))["state"] == "OPEN"

        await eventually(open_now, timeout=10)
        done = [await cluster_node.wait_finished(queue, i, 20_000, prefix=PREFIX) for i in ids]
    assert [job["state"] for job in done] == ["completed"] * jobs, done
    assert all(job["attemptsMade"] <= 2 for job in done), done  # parked waits use none
    assert openai_fake.calls == 2 + jobs  # the two faults, then each job once
    assert await web_status(cluster, prefix) == CLOSED_AFRESH
    month = time.strftime("%Y-%m", time.gmtime())
    assert int(await cluster.get(budget_key(prefix, USER_ID, month, "settled", True)) or 0) > 0
    limited = [key async for key in cluster.scan_iter(match=f"{{{prefix}ratelimit:openai:*")]
    assert len(limited) == 1 and limited[0].endswith("}:requests"), limited
    await cluster_node.obliterate(queue, prefix=PREFIX)


# --- the CLI on a cluster ----------------------------------------------------------------------


async def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await WorkerProcess.start(env, *args)
    return await proc.wait(timeout=60), proc.output


async def test_the_cli_speaks_to_a_cluster_as_the_service_does(cluster_urls: list[str]) -> None:
    """enqueue, stats and check through the cluster client, found by INFO (no REDIS_CLUSTER),
    from a node that does not own the queue's slot: a single-node client would meet MOVED."""
    queue = unique_queue("cluster-cli")
    owner = slot_owner(cluster_urls, slot_of(cluster_urls, f"{PREFIX}:{queue}:marker"))
    seed = next(url for url in cluster_urls if url != owner)
    env = {"REDIS_URL": seed, "WORKER_QUEUE": queue, "WORKER_PREFIX": PREFIX,
           "WORKER_JOB_TYPES": "ping", "WORKER_HEALTH_PORT": str(free_port())}  # fmt: skip
    settings = settings_for(seed, queue, WORKER_PREFIX=PREFIX)
    async with running_service(settings):
        code, out = await cli(env, "enqueue", "ping", "--data", '{"echo": "ñ"}', "--wait")
        assert code == 0, out
        final = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        assert final["status"] == "completed" and final["result"]["echo"] == "ñ", final
        code, out = await cli(env, "stats", "--all", "--capacity")
        assert code == 0, out
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        stats, every, capacity = lines[-3:]
        assert stats["stats"]["completed"] == 1 and stats["stats"]["total"] == 1, stats
        assert every["backlog"] == 0 and capacity["capacity"]["workers"] == 1, (every, capacity)
    code, out = await cli(env, "check")
    assert code == 0, out
    host_port = owner.removeprefix("redis://")
    assert f"redis cluster: 3 masters; queue {queue} on {host_port}" in out, out
    untagged = {**env, "WORKER_PREFIX": "bull"}
    (check_code, check_out), (add_code, add_out) = await asyncio.gather(
        cli(untagged, "check"), cli(untagged, "enqueue", "ping")
    )
    assert check_code == 1 and "[FAIL] WORKER_PREFIX: 'bull' has no hash tag" in check_out
    assert add_code == 2 and "Configuration error: WORKER_PREFIX: 'bull' has no" in add_out


async def test_jobs_go_on_when_a_replica_takes_over_the_queues_master(
    cluster_urls: list[str], cluster_node: NodeBridge
) -> None:
    """The master owning the queue's slot loses it to its replica (CLUSTER FAILOVER TAKEOVER,
    as when the master dies and the replica is promoted) mid-run: commands follow the MOVED,
    the blocking wait moves to the new master, and every job runs once, without a restart."""
    queue = unique_queue("cluster-failover")
    slot = slot_of(cluster_urls, f"{PREFIX}:{queue}:marker")
    owner = slot_owner(cluster_urls, slot)
    runs: Counter[int] = Counter()
    mid_run = asyncio.Event()

    async def count(payload: dict[str, Any], ctx: JobContext) -> dict[str, int]:
        runs[payload["n"]] += 1
        if sum(runs.values()) >= 40:
            mid_run.set()
        await asyncio.sleep(0.005)
        return {"n": payload["n"]}

    opts = {"removeOnComplete": False, "attempts": 1}

    def batch(first: int, n: int) -> list[dict[str, Any]]:
        return [{"name": "count", "data": {"n": i}, "opts": opts} for i in range(first, first + n)]

    settings = settings_for(cluster_urls[0], queue, WORKER_PREFIX=PREFIX, WORKER_CONCURRENCY=4,
                            WORKER_LIMITER_MAX=0)  # fmt: skip
    with redis_cluster_node() as replica:
        await asyncio.to_thread(add_replica, owner, replica)
        with redis.Redis.from_url(replica, decode_responses=True) as r:
            replica_id = str(r.execute_command("CLUSTER", "MYID"))
        try:
            registry = registry_of(ProcessorSpec("count", count))
            async with running_service(settings, registry) as service:
                assert service.worker is not None
                ids = (await cluster_node.add_bulk(queue, batch(0, 200), prefix=PREFIX))["ids"]
                await asyncio.wait_for(mid_run.wait(), 20)
                await asyncio.to_thread(take_over, [*cluster_urls, replica], replica, slot)
                before = sum(runs.values())
                assert before < 200, "the takeover came too late to be mid-run"
                ids += (await cluster_node.add_bulk(queue, batch(200, 100), prefix=PREFIX))["ids"]
                for job_id in ids:
                    job = await cluster_node.wait_finished(queue, job_id, 30_000, prefix=PREFIX)
                    assert job["state"] == "completed", job
                host, port = replica.removeprefix("redis://").split(":")
                assert service.worker.protocol._blocking_at == (host, int(port))
            await cluster_node.obliterate(queue, prefix=PREFIX)
        finally:
            # the old master, now its replica, takes the slot back
            await asyncio.to_thread(take_over, [*cluster_urls, replica], owner, slot)
    await asyncio.to_thread(forget, cluster_urls, replica_id)
    assert sorted(runs) == list(range(300)) and set(runs.values()) == {1}, runs.most_common(3)
    print(f"cluster failover: 300 jobs, the takeover after {before} ran")
