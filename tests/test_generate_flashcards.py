"""generate-flashcards against local OpenAI and PostgREST servers, the real SDKs pointed at them.

Each test calls the handler the way the runtime does (payload validated against the contract
first, result validated after) and counts the OpenAI calls and the attempts it took. BullMQ's
part (retry with backoff, queue pause on RateLimited) is the runtime's and is tested there;
here an "attempt" is one more handler call with `ctx.attempt` raised.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from loguru import logger
from openai import AsyncOpenAI

from processors import generate_flashcards as gf
from processors.shared.budget import (
    NOT_CONFIGURED_NOTE,
    OVER_BUDGET_MESSAGE,
    OverBudget,
    estimate_tokens,
)
from processors.shared.openai_client import (
    RATE_LIMIT_DEFAULT_S,
    RATE_LIMIT_MAX_S,
    RATE_LIMIT_MIN_S,
    ReplyCutOff,
    ReplyFiltered,
    ReplyRefused,
    retry_after_s,
)
from tests.fakes.fixtures import Tables, users_table
from tests.fakes.openai_server import (
    FakeOpenAI,
    Scripted,
    completion,
    error,
    insufficient_quota,
    rate_limited,
    refused,
    request_too_large,
    server_error,
    slow,
)
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.processor_job import CONTRACT, ProcessorJob, lift_openai_cooldown
from worker.errors import (
    ConfigError,
    Deferred,
    PermanentJobError,
    RateLimited,
    RetryableJobError,
)
from worker.keys import rate_key
from worker.registry import ProcessorSpec

USER_ID = "5f0c1e9a-3b7d-4c2e-9a61-0d8b2f4e7c13"
INCREMENT_PATH = "/rest/v1/rpc/increment_tokens"

CONTENT = (
    "Cardiology studies the heart. An electrocardiogram records its rhythm; arrhythmia is an "
    "irregular rhythm. Pathology studies disease through biopsy and histology. Radiology uses "
    "X-rays, ultrasound and magnetic resonance imaging."
)


# --- helpers ---------------------------------------------------------------------------------


def payload(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "content": CONTENT,
        "subject": "Medicine",
        "topic": "Cardiology",
        "userId": USER_ID,
        "nativeLanguage": "Spanish",
        "targetLanguage": "English",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def card(front: str, topic: str, **fields: str) -> dict[str, str]:
    return {
        "front": front,
        "back": fields.get("back", f"{front} (es)"),
        "topic": topic,
        "difficulty": fields.get("difficulty", "beginner"),
        "example": fields.get("example", f"The {front} matters."),
        "pronunciation": fields.get("pronunciation", f"/{front}/"),
    }


@pytest.fixture
def db_tables() -> Tables:
    return users_table(USER_ID, email="a@example.com")


@pytest_asyncio.fixture
async def dummy_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # The test session's Redis: OpenAI's breaker and rate limit and the budget holds live there
    # (under the stand-ins' own PROTECTION_KEY_PREFIX).
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def new_job(
    stand_in_env: dict[str, str], dummy_redis: aioredis.Redis
) -> AsyncIterator[Callable[..., ProcessorJob]]:
    """`new_job(data=..., env_changes=...)` builds the processor from env and wraps a job."""
    specs: list[ProcessorSpec] = []

    def make(
        data: dict[str, Any] | None = None, env_changes: dict[str, str | None] | None = None
    ) -> ProcessorJob:
        merged = {**stand_in_env, **(env_changes or {})}
        spec = gf.build({k: v for k, v in merged.items() if v is not None})
        specs.append(spec)
        return ProcessorJob(spec, dummy_redis, data or payload())

    yield make
    for spec in specs:
        assert spec.aclose is not None
        await spec.aclose()


def increments(db: FakePostgrest) -> list[Any]:
    return db.rpc_calls("increment_tokens")


# --- success ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fixed_topic_success_cleans_cards_and_accounts_tokens(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(
        completion(
            {
                "flashcards": [
                    card("Electrocardiogram", " Cardiology "),
                    card(" electrocardiogram ", "cardiology"),  # duplicate of the first: dropped
                    card("Arrhythmia", "   "),  # empty topic → General
                    card("Arrhythmia", "Cardiology", back="arritmia"),  # another topic: kept
                    card("Heart", "Cardiology", difficulty="intermediate"),
                ]
            },
            prompt_tokens=1500,
            completion_tokens=700,
            cached_tokens=1024,
        )
    )
    job = new_job()
    result = await job.attempt()

    assert result["success"] is True
    assert result["tokenUsage"] == 2200
    assert [(c["front"], c["topic"]) for c in result["flashcards"]] == [
        ("Electrocardiogram", "Cardiology"),
        ("Arrhythmia", "General"),
        ("Arrhythmia", "Cardiology"),
        ("Heart", "Cardiology"),
    ]
    assert set(result["flashcards"][0]) == set(gf.CARD_FIELDS)
    assert job.progress == [10, 20, 80, 100]

    # One call, SDK retries off, the request as issue 4 describes it.
    assert openai_fake.calls == 1
    sent = openai_fake.chat_requests[0]
    assert sent.header("x-stainless-retry-count") == "0"
    body = sent.body
    assert body["model"] == "gpt-4o-mini"
    assert body["temperature"] == 0.1
    assert body["max_completion_tokens"] == gf.MAX_COMPLETION_TOKENS
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    card_schema = fmt["json_schema"]["schema"]["$defs"]["card"]
    contract_card = CONTRACT.schema(gf.JOB_NAME, "result")["$defs"]["card"]
    assert card_schema["required"] == list(contract_card["properties"])
    assert card_schema["additionalProperties"] is False
    assert card_schema["properties"]["difficulty"]["enum"] == ["beginner", "intermediate", "expert"]
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == gf.SYSTEM_PROMPT
    user = body["messages"][1]["content"]
    assert CONTENT in user
    assert "Requested topic: Cardiology" in user
    assert "TARGET language (front, example): English" in user
    assert "NATIVE language (back): Spanish" in user

    # Budget read before the call, then increment_tokens with the usage.
    reads = db.rest_requests("GET", "/rest/v1/users")
    assert len(reads) == 1
    assert reads[0].param("id") == f"eq.{USER_ID}"
    assert increments(db) == [{"user_id": USER_ID, "input_count": 1500, "output_count": 700}]
    assert db.tables["users"][0]["input_tokens"] == 1000 + 1500
    assert db.tables["users"][0]["output_tokens"] == 500 + 700


async def test_a_lone_surrogate_in_the_content_is_sent_as_valid_unicode(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    # "a\udc00b" is valid JSON and a Node producer enqueues it; it is no valid Unicode to send.
    openai_fake.script(completion({"flashcards": [card("Heart", "Cardiology")]}))
    result = await new_job(data=payload(content=CONTENT + " a\udc00b \ud83d\ude00")).attempt()
    assert result["success"] is True
    raw = openai_fake.chat_requests[0].raw.decode("utf-8")
    assert "\\udc00" not in raw and "\\ud83d" not in raw, "a surrogate escape was sent"
    user = openai_fake.chat_requests[0].body["messages"][1]["content"]
    assert "a\ufffdb \U0001f600" in user  # lone: U+FFFD, as toWellFormed(); a pair: its emoji


@pytest.mark.asyncio
async def test_ai_selection_folds_small_topics_into_the_largest(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    cards = (
        [card(f"Heart term {i}", "Cardiology") for i in range(6)]
        + [card(f"Imaging term {i}", "Radiology") for i in range(5)]
        + [card("Biopsy", "Pathology"), card("Heart term 0", "Pathology")]  # 2 cards: folded
        + [card("Histology", " Lab ")]  # 1 card: folded
    )
    openai_fake.script(completion({"flashcards": cards}))
    job = new_job(payload(topic="AI Selection", targetLanguage="en-GB"))
    result = await job.attempt()

    topics = [c["topic"] for c in result["flashcards"]]
    assert set(topics) == {"Cardiology", "Radiology"}
    fronts = [c["front"] for c in result["flashcards"]]
    # "Heart term 0" from Pathology became a Cardiology duplicate after folding: first one wins.
    assert fronts.count("Heart term 0") == 1
    assert fronts[-2:] == ["Biopsy", "Histology"]
    assert [c["topic"] for c in result["flashcards"][-2:]] == ["Cardiology", "Cardiology"]
    assert len(result["flashcards"]) == 13

    user = openai_fake.chat_requests[0].body["messages"][1]["content"]
    assert "Requested topic: AI Selection" in user
    assert "TARGET language (front, example): English" in user  # en-GB is English


@pytest.mark.asyncio
async def test_legacy_show_native_language_job_targets_english(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(completion({"flashcards": [card("Heart", "Cardiology")]}))
    data = payload(targetLanguage=None, showNativeLanguage=True, nativeLanguage=None)
    await new_job(data).attempt()
    user = openai_fake.chat_requests[0].body["messages"][1]["content"]
    assert "TARGET language (front, example): English" in user
    assert "NATIVE language (back): English" in user  # nativeLanguage defaults to English


@pytest.mark.asyncio
async def test_the_stable_instructions_come_first_for_every_job(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(completion({"flashcards": []}), completion({"flashcards": []}))
    await new_job(payload()).attempt()
    await new_job(payload(content="Other text entirely.", topic="AI Selection")).attempt()
    first, second = (r.body["messages"] for r in openai_fake.chat_requests)
    assert first[0] == second[0]
    assert first[0]["role"] == "system"
    assert first[1] != second[1]
    assert all(r.body["prompt_cache_key"] == gf.JOB_NAME for r in openai_fake.chat_requests)


# --- 429 ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rate_limit_then_success_uses_no_attempt(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
) -> None:
    openai_fake.script(
        rate_limited(retry_after_s=7), completion({"flashcards": [card("Heart", "X")]})
    )
    job = new_job()

    with pytest.raises(RateLimited) as caught:
        await job.attempt(1)
    assert caught.value.retry_after_s == 7.0
    assert (caught.value.provider, caught.value.refused) == ("openai", True)
    assert openai_fake.calls == 1
    assert increments(db) == []  # nothing was billed

    # The runtime parks it without using an attempt. Run again within the Retry-After, it is
    # held back by the cooldown the 429 left for every replica, and calls nobody.
    with pytest.raises(Deferred) as held:
        await job.attempt(1)
    assert held.value.refused and 5 < held.value.delay_s <= 7
    assert "429 cooldown" in str(held.value)
    assert openai_fake.calls == 1

    # Once the Retry-After has passed (its key expires), it runs again as attempt 1.
    cooldown = rate_key(stand_in_env["PROTECTION_KEY_PREFIX"], "openai", "gpt-4o-mini", "cooldown")
    assert 5000 < await job.redis.pttl(cooldown) <= 7000
    await lift_openai_cooldown(job.redis, stand_in_env)
    result = await job.attempt(1)
    assert result["flashcards"][0]["front"] == "Heart"
    assert openai_fake.calls == 2
    assert job.attempts == 1


@pytest.mark.asyncio
async def test_rate_limit_reads_retry_after_ms(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(rate_limited(retry_after_s=30, retry_after_ms=2500))
    with pytest.raises(RateLimited) as caught:
        await new_job().attempt()
    assert caught.value.retry_after_s == 2.5


def test_retry_after_parsing_default_and_bounds() -> None:
    assert retry_after_s({"retry-after": "12"}) == 12.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({}) == RATE_LIMIT_DEFAULT_S
    assert retry_after_s({"retry-after": "soon"}) == RATE_LIMIT_DEFAULT_S
    assert retry_after_s({"retry-after": "0"}) == RATE_LIMIT_MIN_S
    assert retry_after_s({"retry-after": "86400"}) == RATE_LIMIT_MAX_S
    assert retry_after_s({"retry-after": "nan"}) == RATE_LIMIT_DEFAULT_S
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_s({"retry-after": http_date}) <= 31
    # Without Retry-After: the reset header of the limit that was hit.
    resets = {"x-ratelimit-reset-requests": "45s", "x-ratelimit-reset-tokens": "1m30s"}
    assert retry_after_s(resets, limit_type="requests") == 45.0
    assert retry_after_s(resets, limit_type="tokens") == 90.0
    assert retry_after_s(resets) == 90.0
    assert retry_after_s({"x-ratelimit-reset-requests": "6m0s"}) == RATE_LIMIT_MAX_S
    assert retry_after_s({"x-ratelimit-reset-tokens": "20ms"}) == RATE_LIMIT_MIN_S


@pytest.mark.asyncio
async def test_insufficient_quota_fails_at_once(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(insufficient_quota())
    with pytest.raises(PermanentJobError, match="insufficient_quota"):
        await new_job().attempt()
    assert openai_fake.calls == 1


@pytest.mark.asyncio
async def test_request_larger_than_the_tpm_limit_fails_at_once(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    # A 429 that waiting never fixes: requeueing it would pause the queue forever.
    openai_fake.script(request_too_large())
    with pytest.raises(PermanentJobError, match="shorter content"):
        await new_job().attempt()
    assert openai_fake.calls == 1


# --- other HTTP errors ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_server_error_twice_then_success(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(server_error(500), server_error(503), completion({"flashcards": []}))
    job = new_job()
    for expected_calls in (1, 2):
        with pytest.raises(RetryableJobError, match="temporarily unavailable"):
            await job.attempt()
        assert openai_fake.calls == expected_calls  # one call per attempt: no SDK retry
    result = await job.attempt()
    assert result == {"success": True, "flashcards": [], "tokenUsage": 2000}
    assert (job.attempts, openai_fake.calls) == (3, 3)


@pytest.mark.asyncio
async def test_invalid_api_key_fails_at_once_without_echoing_the_key(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    job = new_job(env_changes={"OPENAI_API_KEY": "sk-wrong-key"})
    with pytest.raises(PermanentJobError) as caught:
        await job.attempt()
    message = str(caught.value)
    assert "401 invalid_api_key" in message
    assert "OPENAI_API_KEY" in message and "EXPO_PUBLIC_OPENAI_API_KEY" in message
    assert "sk-" not in message
    assert openai_fake.calls == 1
    assert openai_fake.chat_requests[0].header("authorization") == "Bearer sk-wrong-key"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (error(400, "Invalid value for 'temperature'.", type_="invalid_request_error",
               param="temperature", code="invalid_value"), "400 invalid_value"),
        (error(400, "This model's maximum context length is 128000 tokens.",
               type_="invalid_request_error", code="context_length_exceeded"), "too long"),
        (error(403, "Country, region, or territory not supported",
               type_="request_forbidden", code="unsupported_country_region_territory"), "403"),
        (error(404, "The model `gpt-4o-mini` does not exist or you do not have access to it.",
               type_="invalid_request_error", code="model_not_found"), "404 model_not_found"),
        (error(422, "Unprocessable entity", type_="invalid_request_error"), "422"),
    ],
    ids=["400", "400-context-length", "403", "404", "422"],
)  # fmt: skip
async def test_client_errors_fail_at_once(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, reply: Scripted, expected: str
) -> None:
    openai_fake.script(reply)
    with pytest.raises(PermanentJobError, match=expected):
        await new_job().attempt()
    assert openai_fake.calls == 1


@pytest.mark.asyncio
async def test_timeout_is_retryable(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(slow(5.0), completion({"flashcards": []}))
    job = new_job(env_changes={"OPENAI_TIMEOUT_S": "0.3"})
    started = time.monotonic()
    with pytest.raises(RetryableJobError, match="timed out"):
        await job.attempt()
    assert time.monotonic() - started < 3.0
    assert openai_fake.calls == 1
    result = await job.attempt()  # the next attempt gets the next reply
    assert result["success"] is True
    assert openai_fake.calls == 2


@pytest.mark.asyncio
async def test_connection_refused_is_retryable(new_job: Callable[..., ProcessorJob]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    job = new_job(env_changes={"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    with pytest.raises(RetryableJobError, match="connection"):
        await job.attempt()


# --- unusable replies --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_refusal_fails_at_once_with_the_reason_and_is_still_accounted(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(
        refused("I'm sorry, I can't help with that.", prompt_tokens=900, completion_tokens=12)
    )
    job = new_job()
    with pytest.raises(ReplyRefused) as caught:
        await job.attempt()
    assert isinstance(caught.value, PermanentJobError)
    assert (
        str(caught.value)
        == "The AI declined to process this content: I'm sorry, I can't help with that."
    )
    assert openai_fake.calls == 1
    assert increments(db) == [{"user_id": USER_ID, "input_count": 900, "output_count": 12}]
    assert job.progress == [10, 20, 80]


@pytest.mark.asyncio
async def test_cut_off_reply_fails_at_once_and_is_accounted(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(
        completion('{"flashcards": [{"front": "Hea', finish_reason="length", completion_tokens=8192)
    )
    with pytest.raises(ReplyCutOff, match=r"cut off .* 8192 tokens"):
        await new_job().attempt()
    assert openai_fake.calls == 1
    assert increments(db)[0]["output_count"] == 8192


@pytest.mark.asyncio
async def test_content_filter_fails_at_once(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(completion(None, finish_reason="content_filter"))
    with pytest.raises(ReplyFiltered):
        await new_job().attempt()


# --- budget ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_over_budget_fails_before_any_openai_call(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    db.tables["users"][0].update(input_tokens=0, output_tokens=2_100_000)  # $5.04 spent
    job = new_job()
    with pytest.raises(OverBudget) as caught:
        await job.attempt()
    assert isinstance(caught.value, PermanentJobError)
    assert str(caught.value) == OVER_BUDGET_MESSAGE
    assert str(caught.value) == (
        "This AI usage exceeds your monthly allowance. Please try with shorter content or wait "
        "until next month when your budget resets."
    )
    assert openai_fake.calls == 0
    assert increments(db) == []
    assert job.progress == [10]


@pytest.mark.asyncio
async def test_the_estimate_of_this_call_counts_against_the_budget(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    data = payload(content="word " * 40_000)  # ≈ 50k input + 125k output tokens ≈ $0.33
    messages = gf.build_messages(data)
    estimate = estimate_tokens(messages)
    assert 0.3 < estimate.cost_usd < 0.4
    # Spent: $4.80 — under the allowance on its own, over it with this call's estimate.
    db.tables["users"][0].update(input_tokens=0, output_tokens=2_000_000)
    with pytest.raises(OverBudget):
        await new_job(data).attempt()
    assert openai_fake.calls == 0


def test_estimate_follows_interop() -> None:
    messages = [{"role": "system", "content": "x" * 10}, {"role": "user", "content": "y" * 8}]
    estimate = estimate_tokens(messages)
    assert estimate.input_tokens == (3 + 4) + (2 + 4)
    assert estimate.output_tokens == 33  # ceil(13 × 2.5)
    assert estimate.cost_usd == pytest.approx((13 * 0.60 + 33 * 2.40) / 1_000_000)


@pytest.mark.asyncio
async def test_budget_read_failure_is_retryable_and_calls_no_openai(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    db.fail("GET", "/rest/v1/users", status=500)
    with pytest.raises(RetryableJobError, match="budget"):
        await new_job().attempt()
    assert openai_fake.calls == 0


@pytest.mark.asyncio
async def test_unknown_and_non_uuid_users_count_as_nothing_spent(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(completion({"flashcards": []}), completion({"flashcards": []}))
    await new_job(payload(userId=str(uuid.uuid4()))).attempt()
    # Test users are not UUIDs (the contract allows them): Postgres answers 22P02.
    result = await new_job(payload(userId="test-idempotency-user")).attempt()
    assert result["success"] is True
    assert openai_fake.calls == 2


@pytest.mark.asyncio
async def test_increment_tokens_failure_is_logged_not_fatal(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    db.fail("POST", INCREMENT_PATH, status=500)
    openai_fake.script(completion({"flashcards": [card("Heart", "Cardiology")]}))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        result = await new_job().attempt()
    finally:
        logger.remove(sink)
    assert result["success"] is True
    assert len(increments(db)) == 1
    assert any("Token accounting failed" in line and "fake failure" in line for line in lines)


@pytest.mark.asyncio
async def test_without_supabase_jobs_run_and_build_says_accounting_is_off(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(completion({"flashcards": [card("Heart", "Cardiology")]}))
    job = new_job(env_changes={"SUPABASE_URL": None, "SUPABASE_SERVICE_ROLE_KEY": None})
    assert NOT_CONFIGURED_NOTE in job.spec.notes
    assert "budget checks and token accounting are off" in NOT_CONFIGURED_NOTE
    result = await job.attempt()
    assert result["success"] is True
    assert openai_fake.calls == 1
    assert db.requests == []


def test_anon_key_is_used_but_noted(stand_in_env: dict[str, str]) -> None:
    spec_env = {k: v for k, v in stand_in_env.items() if k != "SUPABASE_SERVICE_ROLE_KEY"}
    spec_env["EXPO_PUBLIC_SUPABASE_ANON_KEY"] = "anon"
    spec = gf.build(spec_env)
    assert any("EXPO_PUBLIC_SUPABASE_ANON_KEY" in note for note in spec.notes)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("key_variable", "url_suffix"),
    [("SUPABASE_SERVICE_ROLE_KEY", ""), ("EXPO_PUBLIC_SUPABASE_ANON_KEY", "/")],
)
async def test_supabase_requests_carry_the_key_as_apikey_and_bearer_token(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    key_variable: str,
    url_suffix: str,
) -> None:
    # What supabase-py sends with an API key: Supabase's gateway wants `apikey`, and PostgREST
    # takes its role from the bearer token, so a key in only one of them is not enough.
    openai_fake.script(completion({"flashcards": [card("Heart", "Cardiology")]}))
    job = new_job(
        env_changes={
            "SUPABASE_SERVICE_ROLE_KEY": None,
            key_variable: db.api_key,
            "SUPABASE_URL": db.url + url_suffix,
        }
    )
    assert (await job.attempt())["success"] is True

    sent = db.rest_requests()
    assert [(r.method, r.path) for r in sent] == [
        ("GET", "/rest/v1/users"),
        ("POST", "/rest/v1/rpc/increment_tokens"),
    ]
    for request in sent:
        assert request.header("apikey") == db.api_key
        assert request.header("authorization") == f"Bearer {db.api_key}"
        assert request.header("accept-profile") == "public"
        assert request.header("content-profile") == "public"
        assert (request.header("x-client-info") or "").startswith("supabase-py/")


# --- configuration -----------------------------------------------------------------------


def test_missing_openai_key_names_both_variables() -> None:
    with pytest.raises(ConfigError) as caught:
        gf.build({"SUPABASE_URL": "http://127.0.0.1:1", "SUPABASE_SERVICE_ROLE_KEY": "k"})
    assert caught.value.variable == "OPENAI_API_KEY"
    assert "EXPO_PUBLIC_OPENAI_API_KEY" in str(caught.value)


def test_every_configuration_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        gf.build({"OPENAI_BASE_URL": "localhost:8080", "SUPABASE_URL": "https://x.supabase.co"})
    assert [e.variable for e in caught.value.each] == [
        "OPENAI_API_KEY", "OPENAI_BASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OPENAI_API_KEY": "k", "OPENAI_TIMEOUT_S": "soon"}, "OPENAI_TIMEOUT_S"),
        ({"OPENAI_API_KEY": "k", "OPENAI_TIMEOUT_S": "0"}, "OPENAI_TIMEOUT_S"),
        ({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "localhost:8080"}, "OPENAI_BASE_URL"),
        ({"OPENAI_API_KEY": "k", "SUPABASE_URL": "https://x.supabase.co"},
         "SUPABASE_SERVICE_ROLE_KEY"),
        ({"OPENAI_API_KEY": "k", "SUPABASE_ANON_KEY": "a"}, "SUPABASE_URL"),
        ({"OPENAI_API_KEY": "k", "EXPO_PUBLIC_SUPABASE_URL": "x.co", "SUPABASE_ANON_KEY": "a"},
         "EXPO_PUBLIC_SUPABASE_URL"),
    ],
)  # fmt: skip
def test_malformed_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        gf.build(env)
    assert caught.value.variable == variable


def test_settings_come_from_the_mapping() -> None:
    from processors.shared.openai_client import OpenAISettings

    s = OpenAISettings.from_env({"EXPO_PUBLIC_OPENAI_API_KEY": "a", "OPENAI_API_KEY": "b"})
    assert (s.api_key, s.api_key_variable) == ("a", "EXPO_PUBLIC_OPENAI_API_KEY")
    assert (s.model, s.timeout_s, s.base_url) == ("gpt-4o-mini", 60.0, "https://api.openai.com/v1")
    assert "api_key='a'" not in repr(s)  # the key never reaches a log line through repr
    s = OpenAISettings.from_env(
        {"OPENAI_API_KEY": "b", "OPENAI_MODEL": "gpt-4.1-mini", "OPENAI_TIMEOUT_S": "12.5"}
    )
    assert (s.model, s.timeout_s) == ("gpt-4.1-mini", 12.5)


# --- post-processing units -----------------------------------------------------------------


def test_fold_small_topics_when_every_topic_is_small() -> None:
    cards = [card("a", "T1"), card("b", "T2"), card("c", "T2"), card("d", "T3")]
    folded = gf.fold_small_topics(cards)
    assert [c["topic"] for c in folded] == ["T2", "T2", "T2", "T2"]


def test_fixed_topic_mode_does_not_fold() -> None:
    cards = [card("a", "Main")] * 1 + [card("b", "Side")]
    assert [c["topic"] for c in gf.clean_cards(cards, ai_selection=False)] == ["Main", "Side"]


def test_clean_cards_drops_cards_without_a_front_and_trims() -> None:
    raw = {"front": " Heart ", "back": " corazón ", "topic": " T ", "difficulty": "Expert",
           "example": " The heart beats. ", "pronunciation": " /hɑːt/ "}  # fmt: skip
    cards = [card("  ", "T"), raw, "not a card"]
    assert gf.clean_cards(cards, ai_selection=False) == [
        {"front": "Heart", "back": "corazón", "topic": "T", "difficulty": "expert",
         "example": "The heart beats.", "pronunciation": "/hɑːt/"}
    ]  # fmt: skip


# --- the fake itself ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fake_openai_refuses_what_openai_would_refuse(openai_fake: FakeOpenAI) -> None:
    client = AsyncOpenAI(api_key="sk-test", base_url=openai_fake.base_url, max_retries=0)
    loose = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}

    def fmt(schema: dict[str, Any]) -> Any:
        return {
            "type": "json_schema",
            "json_schema": {"name": "x", "strict": True, "schema": schema},
        }

    try:
        with pytest.raises(openai.BadRequestError, match="additionalProperties"):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                response_format=fmt(loose),
            )  # fmt: skip
        openai_fake.script(completion({"a": 1}))
        with pytest.raises(openai.BadRequestError, match="breaks the request's json_schema"):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                response_format=fmt({**loose, "additionalProperties": False}),
            )  # fmt: skip
        assert openai_fake.schema_mismatches == ["a: 1 is not of type 'string'"]
        openai_fake.schema_mismatches.clear()
    finally:
        await client.close()


def test_the_system_prompt_keeps_the_rules_the_node_prompt_gave() -> None:
    # Issue 18: each rule of the Node prompt that ours had dropped, in the stable prefix.
    prompt = " ".join(gf.SYSTEM_PROMPT.split())
    for rule in (
        "short, simple sentence",  # example sentences: simple and clear
        "as its focus",  # the term is the sentence's focus
        "about the subject",  # relevant to the subject
        "no jargon beyond that term",
        "Mix the difficulties",
        "a phrase naming one concept",  # concept phrases as fronts
        "following its own headings and sections",  # topic mode
    ):
        assert rule in prompt, rule
    assert "{" not in gf.SYSTEM_PROMPT  # nothing per job in it
