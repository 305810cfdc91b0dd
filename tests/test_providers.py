"""Provider protection shared through Redis (worker/providers.py, the budget's holds): the
breaker and the rate limit against the OpenAI stand-in, through the real service and Node's
producer. Windows, thresholds and caps are scaled down; timings are asserted with slack."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from processors import generate_flashcards as gf
from processors.shared.budget import Budget, OverBudget, TokenEstimate
from tests.fakes.fixtures import Tables, users_table
from tests.fakes.openai_server import FakeOpenAI, Scripted, completion, rate_limited, server_error
from tests.support.harness import eventually, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.protection import race_for_the_probe
from worker.errors import Deferred, PermanentJobError, RateLimited, RetryableJobError
from worker.providers import OPENAI, Provider, ProviderSettings
from worker.registry import Registry

USER_ID = "7d1f3a52-9c4e-4b8a-8f06-2e5d9b1c7a40"
CARD = {"front": "Heart", "back": "Corazón", "topic": "Cardiology", "difficulty": "beginner",
        "example": "The heart pumps blood.", "pronunciation": "/hɑːrt/"}  # fmt: skip
PAYLOAD = {"content": "The heart pumps blood.", "subject": "Medicine", "topic": "Cardiology",
           "userId": USER_ID, "nativeLanguage": "Spanish"}  # fmt: skip


@pytest.fixture
def db_tables() -> Tables:
    return users_table(USER_ID)


def flashcards(env: dict[str, str]) -> Registry:
    registry = Registry()
    registry.register(gf.build(env))
    return registry


async def web_status(redis: aioredis.Redis, prefix: str, name: str = OPENAI) -> dict[str, Any]:
    """One breaker as the web service's /api/circuit-breakers/status reads it (INTEROP §8):
    its four keys, a missing state meaning CLOSED."""
    keys = [f"{prefix}circuit:{name}:{field}"
            for field in ("state", "failures", "successes", "opened_at")]  # fmt: skip
    state, failures, successes, opened_at = await redis.mget(keys)
    return {
        "state": state or "CLOSED",
        "failures": int(failures or 0),
        "successes": int(successes or 0),
        "openedAt": int(opened_at) if opened_at else None,
    }


async def status_if_open(redis: aioredis.Redis, prefix: str) -> dict[str, Any] | None:
    status = await web_status(redis, prefix)
    return status if status["state"] == "OPEN" else None


async def add_jobs(node: NodeBridge, queue: str, n: int) -> list[str]:
    added = await node.add_bulk(
        queue, [{"name": gf.JOB_NAME, "data": {**PAYLOAD, "n": i}} for i in range(n)]
    )
    return list(added["ids"])


async def finished(node: NodeBridge, queue: str, ids: list[str], timeout_s: float) -> list[Any]:
    return list(
        await asyncio.gather(
            *(node.wait_finished(queue, i, timeout_ms=int(timeout_s * 1000)) for i in ids)
        )
    )


# --- the breaker, step by step -------------------------------------------------------------------


async def test_only_faults_count_and_half_open_lets_one_probe_through(
    rclient: aioredis.Redis, redis_url: str, stand_in_env: dict[str, str]
) -> None:
    prefix = stand_in_env["PROTECTION_KEY_PREFIX"]
    env = {**stand_in_env, "OPENAI_BREAKER_FAILURES": "2", "OPENAI_BREAKER_OPEN_S": "0.4"}
    provider = Provider(ProviderSettings.from_env(OPENAI, env), "gpt-4o-mini")

    async def outcome(error: Exception | None, client: aioredis.Redis = rclient) -> Any:
        async with provider.call(client) as permit:
            return await permit.succeeded() if error is None else await permit.failed(error)

    # A 400, a 429, a budget refusal before any call: none counts, and an answer ends a run.
    for error in (RetryableJobError("500"), PermanentJobError("400"), RetryableJobError("500"),
                  RateLimited(0.1, provider=OPENAI)):  # fmt: skip
        await outcome(error)
    await asyncio.sleep(0.15)  # the 429's cooldown holds every call back until then
    with pytest.raises(OverBudget):
        async with provider.call(rclient):
            raise OverBudget()
    assert await web_status(rclient, prefix) == {
        "state": "CLOSED", "failures": 0, "successes": 0, "openedAt": None}  # fmt: skip

    # Two faults in a row open it; the one that opened it parks its job instead of retrying.
    assert isinstance(await outcome(RetryableJobError("502")), RetryableJobError)
    opened = await outcome(RetryableJobError("503"))
    assert isinstance(opened, Deferred) and 0.3 < opened.delay_s <= 0.4
    status = await web_status(rclient, prefix)
    assert status["state"] == "OPEN" and abs(status["openedAt"] - time.time() * 1000) < 2000
    with pytest.raises(Deferred, match="circuit breaker is open"):
        await provider.admit(rclient)

    # Once open_s has passed, replicas race: exactly one call goes through as the probe.
    await asyncio.sleep(0.45)
    other = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        probe = await race_for_the_probe(provider, rclient, other)
    finally:
        await other.aclose()
    assert (await web_status(rclient, prefix))["state"] == "HALF_OPEN"
    await probe.succeeded()  # 1 of the 2 successes it takes to close
    assert (await web_status(rclient, prefix))["successes"] == 1
    await outcome(None)
    assert await web_status(rclient, prefix) == {
        "state": "CLOSED", "failures": 0, "successes": 0, "openedAt": None}  # fmt: skip

    # The web service's reset route, while open, closes ours.
    await outcome(RetryableJobError("500"))
    await outcome(RetryableJobError("500"))
    await rclient.set(f"{prefix}circuit:openai:state", "CLOSED")
    await outcome(None)


async def test_an_outage_fails_no_job_and_calls_openai_only_to_probe(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: aioredis.Redis,
    openai_fake: FakeOpenAI, stand_in_env: dict[str, str],
) -> None:  # fmt: skip
    prefix, failures, open_s, outage_s, jobs, concurrency = (
        stand_in_env["PROTECTION_KEY_PREFIX"], 3, 1.0, 3.0, 12, 3)  # fmt: skip
    env = {**stand_in_env, "OPENAI_BREAKER_FAILURES": str(failures),
           "OPENAI_BREAKER_OPEN_S": str(open_s)}  # fmt: skip
    outage_ends = math.inf

    def upstream() -> Scripted:
        down = time.monotonic() < outage_ends
        return server_error(503) if down else completion({"flashcards": [CARD]})

    openai_fake.fallback = upstream
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=concurrency)
    async with running_service(settings, flashcards(env)):
        outage_ends = time.monotonic() + outage_s
        ids = await add_jobs(node6, queue_name, jobs)
        during = await eventually(lambda: status_if_open(rclient, prefix), timeout=outage_s)
        assert during["state"] == "OPEN" and during["openedAt"]
        done = await finished(node6, queue_name, ids, timeout_s=30)
    after = await web_status(rclient, prefix)
    assert [job["state"] for job in done] == ["completed"] * jobs, done
    assert all(job["attemptsMade"] <= 2 for job in done)  # at most one spent on the outage
    in_outage = [r for r in openai_fake.chat_requests if r.at < outage_ends]
    # The calls that tripped it (and those already in flight when it did), then one probe per
    # open period: each lasts open_s plus the parked jobs' jitter.
    bound = failures + (concurrency - 1) + math.ceil(outage_s / open_s) + 1
    assert failures <= len(in_outage) <= bound, len(in_outage)
    assert after == {"state": "CLOSED", "failures": 0, "successes": 0, "openedAt": None}


async def test_a_429_that_never_lifts_fails_each_job_at_the_cap_naming_the_provider(
    node6: NodeBridge, redis_url: str, queue_name: str, openai_fake: FakeOpenAI,
    stand_in_env: dict[str, str],
) -> None:  # fmt: skip
    cap_s, retry_after_s, jobs = 3.0, 1.0, 4
    openai_fake.fallback = lambda: rate_limited(retry_after_s=retry_after_s)
    settings = settings_for(redis_url, queue_name, WORKER_RATE_LIMIT_MAX_WAIT_S=cap_s)
    async with running_service(settings, flashcards(stand_in_env)):
        started = time.monotonic()
        ids = await add_jobs(node6, queue_name, jobs)
        done = await finished(node6, queue_name, ids, timeout_s=cap_s + 10)
        took = time.monotonic() - started
    for job in done:
        assert job["state"] == "failed" and job["attemptsMade"] == 1, job
        assert job["failedReason"].startswith(
            "The AI service (openai) kept refusing with rate limits (429) for "
        ), job["failedReason"]
        assert f"WORKER_RATE_LIMIT_MAX_WAIT_S ({cap_s:g} s)" in job["failedReason"]
    assert cap_s - 0.5 < took < cap_s + 8  # slack: 7.45 s seen with both cores busy
    # The cooldown a 429 leaves parks the other jobs without a call: about one call per
    # Retry-After, not one per job (jobs x cap / Retry-After = 12 without it).
    assert openai_fake.calls <= jobs + 2 * cap_s / retry_after_s, openai_fake.calls


async def test_two_workers_share_one_requests_per_minute_limit(
    node6: NodeBridge, redis_url: str, queue_name: str, openai_fake: FakeOpenAI,
    stand_in_env: dict[str, str],
) -> None:  # fmt: skip
    # OPENAI_RPM=60 scaled down: 6 requests per 3 s window, two services of 3 slots each.
    limit, window_s, jobs = 6, 3.0, 14
    env = {**stand_in_env, "OPENAI_RPM": str(limit), "OPENAI_RATE_WINDOW_S": str(window_s)}
    openai_fake.fallback = lambda: completion({"flashcards": [CARD]})
    settings = settings_for(redis_url, queue_name, WORKER_CONCURRENCY=3)
    async with running_service(settings, flashcards(env)) as one, \
            running_service(settings, flashcards(env)) as two:  # fmt: skip
        ids = await add_jobs(node6, queue_name, jobs)
        done = await finished(node6, queue_name, ids, timeout_s=40)
        ran = (one.stats.succeeded, two.stats.succeeded)
    assert [job["state"] for job in done] == ["completed"] * jobs
    assert all(job["attemptsMade"] == 1 for job in done)  # waits used no attempt
    assert min(ran) > 0, ran  # both took part
    arrivals = sorted(r.at for r in openai_fake.chat_requests)
    assert len(arrivals) == jobs
    # GCRA spaces the calls window/limit apart, so no window holds more than the limit; the
    # 0.2 s allow for the time between a call's admission and its arrival here.
    busiest = max(sum(1 for t in arrivals if a <= t < a + window_s - 0.2) for a in arrivals)
    assert busiest <= limit, arrivals
    assert arrivals[-1] - arrivals[0] >= (jobs - 1) * window_s / limit - 0.5


# --- the budget's holds ------------------------------------------------------------------------


@pytest.fixture
def near_the_limit() -> Tables:
    # $4.99 of $5.00 spent: room for two calls of $0.0036, not three.
    return users_table(USER_ID, input_tokens=8_316_667, output_tokens=0)


async def test_concurrent_jobs_of_one_user_cannot_spend_the_same_allowance(
    rclient: aioredis.Redis, stand_in_env: dict[str, str], db: Any, near_the_limit: Tables
) -> None:
    db.tables.update(near_the_limit)
    budget = Budget.from_env(stand_in_env)
    estimate = TokenEstimate(1000, 1250)  # $0.0006 + $0.0030
    try:
        tries = [budget.reserve(rclient, USER_ID, estimate) for _ in range(5)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        held = [r for r in results if not isinstance(r, BaseException)]
        assert len(held) == 2 and sum(isinstance(r, OverBudget) for r in results) == 3
        await held[0].release()  # that call never happened: its share is free again
        again = await budget.reserve(rclient, USER_ID, estimate)
        with pytest.raises(OverBudget):
            await budget.reserve(rclient, USER_ID, estimate)
        for reservation in (held[1], again):
            await reservation.release()
    finally:
        await budget.aclose()
