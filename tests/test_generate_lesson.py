"""generate-lesson against local OpenAI and PostgREST servers, the real SDKs pointed at them.

Most tests call the handler the way the runtime does (payload validated first, result after),
with a real Redis for the job's resumable state; an "attempt" is one more handler call with
`ctx.attempt` raised. The tests at the end run the real service: in-process for the
idempotency entry, and as `python -m worker` killed with SIGKILL between steps and inside
the Supabase crash windows, then restarted.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from loguru import logger

from processors import generate_lesson as gl
from processors.shared import lesson_steps as steps
from processors.shared.budget import OVER_BUDGET_MESSAGE, OverBudget
from processors.shared.job_state import RESULT_TTL_S, STATE_TTL_S
from tests.fakes.fixtures import Tables, users_table
from tests.fakes.openai_server import (
    FakeOpenAI,
    Scripted,
    completion,
    rate_limited,
    refused,
    server_error,
    slow,
)
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.harness import eventually, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from tests.support.processor_job import ProcessorJob, lift_openai_cooldown
from worker.errors import ConfigError, Deferred, PermanentJobError, RateLimited, RetryableJobError
from worker.idempotency import idempotency_key
from worker.registry import ProcessorSpec, Registry

USER_ID = "5f0c1e9a-3b7d-4c2e-9a61-0d8b2f4e7c13"
LESSONS = "/rest/v1/esp_lessons"
VOCABULARY = "/rest/v1/lesson_vocabulary"

CONTENT = (
    "Cardiology studies the heart. The heart rate and an electrocardiogram show its rhythm; "
    "an arrhythmia is an irregular rhythm and a valve can leak. Pathology studies disease: "
    "a biopsy takes tissue, and histology looks at it under the microscope."
)
RAW_KEYWORDS = [
    "Heart", "heart rate", "Electrocardiogram", " arrhythmia ", "valve", "Biopsy",
    "histology", "pathology", "tissue", "42", "x", "heart",
]  # fmt: skip
# After clean-up: lower case, "42" and "x" dropped, "heart" folded into "heart rate".
KEYWORDS = ["heart rate", "electrocardiogram", "arrhythmia", "valve",
            "biopsy", "histology", "pathology", "tissue"]  # fmt: skip
TOPICS = [
    {"name": "Cardiología", "keywords": KEYWORDS[:4]},
    {"name": "Patología", "keywords": KEYWORDS[4:]},
]
STEP = {  # the strict schema's name in each request → a short label
    "lesson_keywords": "K", "lesson_topics": "T", "lesson_vocabulary_english": "V",
    "lesson_vocabulary_other": "V", "lesson_conversation": "C",
}  # fmt: skip
# Usage per call, distinct so sums and per-call accounting can be checked.
USAGE = {"K": (100, 50), "T": (200, 60), "V1": (300, 70), "C1": (400, 80), "V2": (500, 90),
         "C2": (600, 100)}  # fmt: skip
ORDER = ["K", "T", "V1", "C1", "V2", "C2"]
TOTAL_TOKENS = sum(a + b for a, b in USAGE.values())


# --- replies ---------------------------------------------------------------------------------


def payload(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "content": CONTENT,
        "subject": "Medicine",
        "topic": "Specialties",
        "userId": USER_ID,
        "nativeLanguage": "Spanish",
        "targetLanguage": "English",
        "sourceFileName": "medicine-week-1.pdf",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def vocabulary(terms: list[str], *, english: bool = True) -> dict[str, Any]:
    if english:
        items = [
            {"english_term": t, "definition": f"{t}: a term of medicine",
             "native_translation": f"{t} (es)", "example_sentence_target": f"The {t} matters.",
             "example_sentence_native": f"El {t} importa."}
            for t in terms
        ]  # fmt: skip
    else:
        items = [
            {"target_term": f"le {t}", "definition": f"{t} : un terme de médecine",
             "target_translation": f"{t} (es)",
             "example_sentence_target_language": f"Le {t} compte.",
             "example_sentence_native": f"El {t} importa."}
            for t in terms
        ]  # fmt: skip
    return {"vocabulary": items}


def vocabulary_terms(topic: int, *, english: bool = True) -> list[str]:
    """The terms of `vocabulary()` for TOPICS[topic] (what a conversation must use)."""
    return [t if english else f"le {t}" for t in TOPICS[topic]["keywords"]]


def conversation(topic: int, *, english: bool = True, leave_out: int = 0) -> dict[str, Any]:
    """A script for TOPICS[topic] that uses its terms, all but the last `leave_out`."""
    terms = vocabulary_terms(topic, english=english)
    used = terms[: len(terms) - leave_out]
    return {
        "conversation": [
            {"speaker": "Assistant", "message": f"Let's talk about {TOPICS[topic]['name']}."},
            {"speaker": "User", "message": f"Gladly: {', '.join(used)}."},
        ]
    }


def reply(label: str, *, english: bool = True) -> Scripted:
    """The scripted answer to call `label` (K, T, V1, C1, V2, C2)."""
    prompt, out = USAGE[label]
    if label == "K":
        content: Any = {"keywords": RAW_KEYWORDS}
    elif label == "T":
        content = {"topics": TOPICS}
    elif label[0] == "V":
        content = vocabulary(TOPICS[int(label[1]) - 1]["keywords"], english=english)
    else:
        content = conversation(int(label[1]) - 1, english=english)
    return completion(content, prompt_tokens=prompt, completion_tokens=out)


def script_all(fake: FakeOpenAI, *, english: bool = True) -> None:
    fake.script(*(reply(label, english=english) for label in ORDER))


def steps_called(fake: FakeOpenAI) -> list[str]:
    return [STEP[r.body["response_format"]["json_schema"]["name"]] for r in fake.chat_requests]


# --- the handler, called like the runtime calls it -------------------------------------------


@pytest.fixture
def db_tables() -> Tables:
    return users_table(USER_ID)


@pytest_asyncio.fixture
async def new_job(
    stand_in_env: dict[str, str], rclient: aioredis.Redis
) -> AsyncIterator[Callable[..., ProcessorJob]]:
    specs: list[ProcessorSpec] = []
    jobs: list[ProcessorJob] = []

    def make(data: dict[str, Any] | None = None) -> ProcessorJob:
        spec = gl.build(stand_in_env)
        specs.append(spec)
        jobs.append(ProcessorJob(spec, rclient, data or payload()))
        return jobs[-1]

    yield make
    for job in jobs:
        await rclient.delete(job.state_key)
    for spec in specs:
        assert spec.aclose is not None
        await spec.aclose()


class LogLines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, message: Any) -> None:
        self.lines.append((message.record["level"].name, message.record["message"]))

    def find(self, text: str, level: str | None = None) -> list[str]:
        return [m for lv, m in self.lines if text in m and (level is None or lv == level)]


@pytest.fixture
def logs() -> Iterator[LogLines]:
    sink = LogLines()
    handler = logger.add(sink, level="INFO", format="{message}")
    yield sink
    logger.remove(handler)


def rows_of(db: FakePostgrest, table: str) -> list[dict[str, Any]]:
    return db.tables[table]


def assert_written_once(db: FakePostgrest, *, topics: int = 2) -> None:
    lessons = rows_of(db, "esp_lessons")
    assert len(lessons) == topics
    assert len({row["id"] for row in lessons}) == topics
    words = rows_of(db, "lesson_vocabulary")
    per_lesson = Counter(row["lesson_id"] for row in words)
    assert per_lesson == {row["id"]: len(TOPICS[i]["keywords"]) for i, row in enumerate(lessons)}


# --- success ---------------------------------------------------------------------------------


async def test_english_target_writes_lessons_vocabulary_and_conversations(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, logs: LogLines
) -> None:
    script_all(openai_fake)
    job = new_job()
    result = await job.attempt()

    assert steps_called(openai_fake) == ["K", "T", "V", "C", "V", "C"]
    assert job.progress == [10, 20, 30, 46, 62, 78, 95, 100]
    assert result["success"] is True
    assert result["tokenUsage"] == TOTAL_TOKENS

    # One esp_lessons row per topic, with the payload in its right places.
    lessons = rows_of(db, "esp_lessons")
    assert [row["title"] for row in lessons] == ["Medicine - Cardiología", "Medicine - Patología"]
    for row in lessons:
        assert row["user_id"] == USER_ID
        assert row["subject"] == "Medicine"
        assert row["source_pdf_name"] == "medicine-week-1.pdf"
        assert row["native_language"] == "Spanish"
        uuid.UUID(row["id"])  # made by the worker
    # The result's lessons are the rows as Supabase holds them, conversation included.
    assert result["lessons"] == lessons
    script = json.loads(lessons[0]["chat_content"])
    assert script == conversation(0)

    # lesson_vocabulary: INTEROP's columns from the English fields.
    assert_written_once(db)
    first = next(r for r in rows_of(db, "lesson_vocabulary") if r["keywords"] == "heart rate")
    assert first == {
        "lesson_id": lessons[0]["id"], "keywords": "heart rate",
        "definition": "heart rate: a term of medicine", "native_translation": "heart rate (es)",
        "example_sentence_target": "The heart rate matters.",
        "example_sentence_native": "El heart rate importa.", "id": first["id"],
        "created_at": first["created_at"],
    }  # fmt: skip

    # The requests: strict schemas from the contract, temperatures, limits, languages.
    bodies = [r.body for r in openai_fake.chat_requests]
    assert all(b["model"] == "gpt-4o-mini" for b in bodies)
    assert [b["temperature"] for b in bodies] == [0.1, 0.1, 0.1, 0.7, 0.1, 0.7]
    assert bodies[3]["max_completion_tokens"] == 2000
    vocab_schema = bodies[2]["response_format"]["json_schema"]
    assert vocab_schema["name"] == "lesson_vocabulary_english"
    item = vocab_schema["schema"]["$defs"]["vocabularyItemEnglish"]
    assert item["required"] == list(steps.ENGLISH_FIELDS)
    assert item["additionalProperties"] is False
    keywords_user = bodies[0]["messages"][1]["content"]
    assert CONTENT in keywords_user and "between 5 and 7" in keywords_user
    topics_user = bodies[1]["messages"][1]["content"]
    assert "NATIVE language (topic names): Spanish" in topics_user
    assert json.dumps(KEYWORDS, ensure_ascii=False) in topics_user
    for body in (bodies[2], bodies[3]):
        user = body["messages"][1]["content"]
        assert "TARGET language: English" in user and "NATIVE language: Spanish" in user
        assert "medicine-week-1.pdf" not in user  # the old worker's mix-up
    assert bodies[0]["messages"][0]["content"] == steps.KEYWORDS_PROMPT

    # Budget read before every call, increment_tokens after every call, conversations too.
    assert len(db.rest_requests("GET", "/rest/v1/users")) == 6
    assert db.rpc_calls("increment_tokens") == [
        {"user_id": USER_ID, "input_count": USAGE[c][0], "output_count": USAGE[c][1]} for c in ORDER
    ]

    # The state keeps the result, briefly; nothing is left to be accounted for.
    state = await job.state()
    assert state["result"] == result and "pending_usage" not in state
    assert 0 < await job.redis.ttl(job.state_key) <= RESULT_TTL_S
    assert logs.find(
        "Keywords: 12 from the model, 2 not in the content (dropped: 42, x), 8 after clean-up"
    )
    assert logs.find("Conversation of Medicine - Cardiología uses 4/4 terms (100%)")
    assert logs.find("Lessons done: 6 OpenAI calls (at most 8 for 2 topics)")


@pytest.mark.parametrize("target", ["French", "Deutsch"])
async def test_non_english_target_uses_the_other_field_names(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, target: str
) -> None:
    script_all(openai_fake, english=False)
    result = await new_job(payload(targetLanguage=target)).attempt()

    bodies = [r.body for r in openai_fake.chat_requests]
    schema = bodies[2]["response_format"]["json_schema"]
    assert schema["name"] == "lesson_vocabulary_other"
    assert schema["schema"]["$defs"]["vocabularyItemOther"]["required"] == list(steps.OTHER_FIELDS)
    assert bodies[2]["messages"][0]["content"] == steps.VOCABULARY_OTHER_PROMPT
    assert f"TARGET language: {target}" in bodies[2]["messages"][1]["content"]
    assert f"TARGET language: {target}" in bodies[3]["messages"][1]["content"]
    assert "- le heart rate: heart rate (es)\n" in bodies[3]["messages"][1]["content"]

    word = next(r for r in rows_of(db, "lesson_vocabulary") if r["keywords"] == "le valve")
    assert word["native_translation"] == "valve (es)"  # from target_translation
    assert word["example_sentence_target"] == "Le valve compte."  # ..._target_language
    assert word["example_sentence_native"] == "El valve importa."
    assert word["definition"] == "valve : un terme de médecine"
    assert result["lessons"][0]["source_pdf_name"] == "medicine-week-1.pdf"
    assert_written_once(db)


@pytest.mark.parametrize("target", ["en-GB", "english", None])
async def test_english_spellings_and_the_default_pick_the_english_fields(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, target: str | None
) -> None:
    script_all(openai_fake)
    await new_job(payload(targetLanguage=target, sourceFileName=None)).attempt()
    names = [r.body["response_format"]["json_schema"]["name"] for r in openai_fake.chat_requests]
    assert names[2] == "lesson_vocabulary_english"


async def test_defaults_for_native_language_and_source_file(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    script_all(openai_fake)
    await new_job(payload(nativeLanguage=None, sourceFileName=None)).attempt()
    row = rows_of(db, "esp_lessons")[0]
    assert (row["native_language"], row["source_pdf_name"]) == ("English", "Unknown Source")


async def test_keyword_count_scales_with_the_content(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    long_content = " ".join(f"word{i}" for i in range(800))
    openai_fake.script(completion({"keywords": ["1", "x"]}))  # nothing usable: fails at once
    job = new_job(payload(content=long_content))
    with pytest.raises(PermanentJobError, match="No key terms"):
        await job.attempt()
    assert "between 56 and 104" in openai_fake.chat_requests[0].body["messages"][1]["content"]
    assert steps.keyword_range("one two") == (5, 7)
    assert steps.keyword_range("w " * 100_000) == (84, 156)
    assert (await job.state())["tokens"] == 2000  # the call was paid, and counted


# --- failures, retries and resumption ---------------------------------------------------------


@pytest.mark.parametrize("failing", ORDER)
async def test_a_failure_at_each_step_then_a_retry_resumes_without_paying_twice(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, failing: str
) -> None:
    replies = [reply(label) for label in ORDER]
    replies.insert(ORDER.index(failing), server_error(503))
    openai_fake.script(*replies)
    job = new_job()

    with pytest.raises(RetryableJobError, match="temporarily unavailable"):
        await job.attempt()
    done = ORDER.index(failing)
    assert openai_fake.calls == done + 1
    result = await job.attempt()

    # Every step asked once, except the one that failed (whose 503 was not billed).
    assert openai_fake.calls == len(ORDER) + 1
    labels = steps_called(openai_fake)
    assert labels[: done + 1] + labels[done + 2 :] == [label[0] for label in ORDER]
    assert result["tokenUsage"] == TOTAL_TOKENS
    assert len(db.rpc_calls("increment_tokens")) == len(ORDER)
    assert job.progress == [10, 20, 30, 46, 62, 78, 95, 100]
    assert_written_once(db)
    assert all(row["chat_content"] for row in rows_of(db, "esp_lessons"))


@pytest.mark.parametrize(
    ("method", "path", "after_write"),
    [
        ("POST", LESSONS, False),
        ("POST", LESSONS, True),  # inserted, but the worker never heard: the crash window
        ("POST", VOCABULARY, False),
        ("POST", VOCABULARY, True),
        ("PATCH", LESSONS, False),
        ("PATCH", LESSONS, True),
    ],
    ids=["lesson", "lesson-lost-answer", "vocabulary", "vocabulary-lost-answer", "chat",
         "chat-lost-answer"],
)  # fmt: skip
async def test_a_supabase_failure_at_each_write_then_a_retry_writes_once(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    method: str,
    path: str,
    after_write: bool,
) -> None:
    script_all(openai_fake)
    db.fail(method, path, status=503, after_write=after_write)
    job = new_job()
    with pytest.raises(RetryableJobError, match="Supabase"):
        await job.attempt()
    result = await job.attempt()
    assert openai_fake.calls == len(ORDER)  # nothing asked twice
    assert_written_once(db)
    assert result["lessons"] == rows_of(db, "esp_lessons")
    assert all(row["chat_content"] for row in result["lessons"])


async def test_rate_limit_mid_job_requeues_and_the_same_attempt_resumes(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
) -> None:
    replies = [reply(label) for label in ORDER]
    replies.insert(4, rate_limited(retry_after_s=3))  # before the second vocabulary
    openai_fake.script(*replies)
    job = new_job()
    with pytest.raises(RateLimited) as caught:
        await job.attempt(1)
    assert caught.value.retry_after_s == 3.0
    with pytest.raises(Deferred, match="429 cooldown"):  # within the Retry-After: no call
        await job.attempt(1)
    # The Retry-After has passed (the cooldown's key expired): the parked job resumes.
    await lift_openai_cooldown(job.redis, stand_in_env)
    result = await job.attempt(1)  # a requeue uses no attempt
    assert openai_fake.calls == len(ORDER) + 1
    assert result["tokenUsage"] == TOTAL_TOKENS
    assert_written_once(db)


async def test_a_rerun_after_the_result_was_saved_answers_from_the_state(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    # A crash between the processor returning and BullMQ marking the job completed.
    script_all(openai_fake)
    job = new_job()
    first = await job.attempt()
    again = await job.attempt()
    assert again == first
    assert openai_fake.calls == len(ORDER)
    assert job.progress == [10, 100]
    assert_written_once(db)


async def test_usage_whose_accounting_a_crash_interrupted_is_sent_on_resume(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    job = new_job()
    # As left by a run killed after saving the keywords call, before increment_tokens.
    saved = {"keywords": KEYWORDS, "tokens": 150, "pending_usage": {"input": 100, "output": 50}}
    await job.redis.hset(job.state_key, mapping={k: json.dumps(v) for k, v in saved.items()})
    openai_fake.script(*(reply(label) for label in ORDER[1:]))
    result = await job.attempt()
    increments = db.rpc_calls("increment_tokens")
    assert increments[0] == {"user_id": USER_ID, "input_count": 100, "output_count": 50}
    assert len(increments) == len(ORDER)
    assert steps_called(openai_fake) == ["T", "V", "C", "V", "C"]
    assert result["tokenUsage"] == TOTAL_TOKENS


async def test_the_state_lives_beside_the_job_with_a_ttl_while_it_runs(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    openai_fake.script(reply("K"), reply("T"), reply("V1"), server_error(500))
    job = new_job()
    with pytest.raises(RetryableJobError):
        await job.attempt()
    state = await job.state()
    assert state["keywords"] == KEYWORDS
    assert state["topics"] == TOPICS
    lesson = rows_of(db, "esp_lessons")[0]
    assert state["lesson_id:0"] == lesson["id"] and state["lesson:0"]["id"] == lesson["id"]
    assert state["words:0"] == 4 and "chat:0" not in state
    assert state["tokens"] == sum(a + b for a, b in (USAGE["K"], USAGE["T"], USAGE["V1"]))
    assert STATE_TTL_S - 60 < await job.redis.ttl(job.state_key) <= STATE_TTL_S


# --- conversations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        refused("I can't help with that.", prompt_tokens=400, completion_tokens=80),
        completion('{"conversation": [{"speaker": "Assis', finish_reason="length",
                   prompt_tokens=400, completion_tokens=80),
        completion({"conversation": [{"speaker": "User", "message": "  "}]},
                   prompt_tokens=400, completion_tokens=80),
    ],
    ids=["refused", "cut-off", "empty"],
)  # fmt: skip
async def test_a_conversation_that_cannot_be_generated_leaves_chat_content_null_and_says_so(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    logs: LogLines,
    bad: Scripted,
) -> None:
    openai_fake.script(reply("K"), reply("T"), reply("V1"), bad, reply("V2"), reply("C2"))
    job = new_job()
    result = await job.attempt()
    first, second = result["lessons"]
    assert first["chat_content"] is None and second["chat_content"]
    assert rows_of(db, "esp_lessons")[0]["chat_content"] is None
    warned = logs.find(f"No conversation for lesson {first['id']}", level="WARNING")
    assert len(warned) == 1 and "kept without one" in warned[0]
    assert result["tokenUsage"] == TOTAL_TOKENS  # the unusable reply was billed and counted
    assert len(db.rpc_calls("increment_tokens")) == len(ORDER)
    assert openai_fake.calls == len(ORDER)


async def test_a_transient_conversation_failure_is_retried_then_given_up_on_the_last_attempt(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, logs: LogLines
) -> None:
    openai_fake.script(
        reply("K"), reply("T"), reply("V1"), server_error(500), server_error(502),
        server_error(500), reply("V2"), reply("C2"),
    )  # fmt: skip
    job = new_job()
    for _ in range(2):  # attempts 1 and 2: BullMQ retries, resuming at the conversation
        with pytest.raises(RetryableJobError):
            await job.attempt()
    result = await job.attempt()  # attempt 3 of 3: the lesson is kept without one
    assert job.attempts == 3
    assert result["lessons"][0]["chat_content"] is None
    assert result["lessons"][1]["chat_content"]
    assert logs.find("No conversation for lesson", level="WARNING")
    assert steps_called(openai_fake) == ["K", "T", "V", "C", "C", "C", "V", "C"]
    assert_written_once(db)


# --- the checks in code: keywords, vocabulary, conversation coverage (issue 18) -----------------


async def test_keywords_that_do_not_occur_in_the_content_are_dropped(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, logs: LogLines
) -> None:
    # The model pads the list with related terms the text never uses; inflected forms of
    # terms it does use stay.
    raw = ["Heart rates", "ARRHYTHMIAS", "stethoscope", "myocardial infarction", "biopsies",
           "Tissue", "valves", "rate heart", "cardiologist"]  # fmt: skip
    openai_fake.script(completion({"keywords": raw}), server_error(500))
    job = new_job()
    with pytest.raises(RetryableJobError):
        await job.attempt()
    kept = ["heart rates", "arrhythmias", "biopsies", "tissue", "valves"]
    assert (await job.state())["keywords"] == kept
    topics_user = openai_fake.chat_requests[1].body["messages"][1]["content"]
    assert f"Terms: {json.dumps(kept)}" in topics_user
    assert logs.find(
        "Keywords: 9 from the model, 4 not in the content (dropped: stethoscope, "
        "myocardial infarction, rate heart, cardiologist), 5 after clean-up"
    )


async def test_only_invented_keywords_fail_the_job_at_once(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI
) -> None:
    openai_fake.script(completion({"keywords": ["stethoscope", "cardiac surgery"]}))
    with pytest.raises(PermanentJobError, match="No key terms"):
        await new_job().attempt()


def test_ground_keywords_ignores_case_accents_and_inflection() -> None:
    content = (
        "Las enfermedades del corazón se estudian con el análisis de sangre; los médicos "
        "miden la presión arterial. Die Herzen schlagen."
    )
    raw = ["Corazon", "enfermedad", "ANÁLISIS DE SANGRE", "presión  arterial", "médico",
           "hipertensión", "sangre arterial", "Herz", 7, " "]  # fmt: skip
    found, absent = steps.ground_keywords(raw, content)
    assert found == ["Corazon", "enfermedad", "ANÁLISIS DE SANGRE", "presión  arterial",
                     "médico", "Herz"]  # fmt: skip
    assert absent == ["hipertensión", "sangre arterial"]


async def test_vocabulary_entries_for_terms_not_asked_for_are_dropped(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, logs: LogLines
) -> None:
    # One invented among them, one repeated at the end.
    padded = vocabulary([KEYWORDS[0], "stethoscope", *KEYWORDS[1:4], "Valves"])
    openai_fake.script(
        reply("K"), reply("T"), completion(padded), reply("C1"), reply("V2"), reply("C2")
    )
    job = new_job()
    await job.attempt()
    assert_written_once(db)  # four rows for the first lesson, as asked
    first = rows_of(db, "esp_lessons")[0]["id"]
    words = [r["keywords"] for r in rows_of(db, "lesson_vocabulary") if r["lesson_id"] == first]
    assert words == KEYWORDS[:4]
    assert [v["english_term"] for v in (await job.state())["vocab:0"]] == KEYWORDS[:4]
    assert logs.find(
        "Vocabulary of Cardiología: 2 entries not for the terms asked, dropped: stethoscope, Valves"
    )


def test_keep_asked_terms_matches_base_forms_and_holds_translations_to_the_count() -> None:
    asked = ["heart rate", "valve", "biopsy", "tissue"]
    terms = ["Heart Rates", "scalpel", "valve", "biopsies", "tissue", "valves"]
    same = steps.clean_vocabulary(vocabulary(terms)["vocabulary"], english=True)
    kept, dropped = steps.keep_asked_terms(same, asked, english=True)
    assert [k["english_term"] for k in kept] == ["Heart Rates", "valve", "biopsies", "tissue"]
    assert dropped == ["scalpel", "valves"]
    # A French target: the terms come back translated, so none match; the count still holds.
    french = vocabulary(["fréquence cardiaque", "valve", "biopsie", "tissu", "scalpel"],
                        english=False)["vocabulary"]  # fmt: skip
    kept, dropped = steps.keep_asked_terms(french, asked, english=False)
    assert [k["target_term"] for k in kept] == [
        "le fréquence cardiaque", "le valve", "le biopsie", "le tissu",
    ]  # fmt: skip
    assert dropped == ["le scalpel"]


async def test_a_conversation_that_leaves_out_terms_is_asked_for_once_more_naming_them(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest, logs: LogLines
) -> None:
    short = completion(conversation(0, leave_out=2), prompt_tokens=400, completion_tokens=80)
    openai_fake.script(
        reply("K"), reply("T"), reply("V1"), short, reply("C1"), reply("V2"), reply("C2")
    )
    job = new_job()
    result = await job.attempt()

    assert steps_called(openai_fake) == ["K", "T", "V", "C", "C", "V", "C"]
    first, again = (r.body["messages"] for r in openai_fake.chat_requests[3:5])
    assert first[0] == again[0] and first[0]["content"] == steps.CONVERSATION_PROMPT
    assert again[1]["content"].startswith(first[1]["content"])
    assert 'left out these terms: ["arrhythmia", "valve"]' in again[1]["content"]
    # Each term goes with its meaning in the native language (its sense in this lesson).
    assert "- valve: valve (es)" in first[1]["content"]
    assert json.loads(result["lessons"][0]["chat_content"]) == conversation(0)
    assert result["tokenUsage"] == TOTAL_TOKENS + 480  # the extra call is paid and counted
    assert len(db.rpc_calls("increment_tokens")) == len(ORDER) + 1
    assert logs.find("uses 2/4 terms (50%); missing: arrhythmia, valve")
    assert logs.find("asked once more: uses 4/4 terms (100%), keeping the second")
    assert logs.find("Lessons done: 7 OpenAI calls (at most 8 for 2 topics)")
    assert (await job.state())["calls"] == 7


@pytest.mark.parametrize(
    ("second", "kept_leave_out", "said"),
    [
        (completion(conversation(0, leave_out=3)), 1, "keeping the first"),
        (completion(conversation(0, leave_out=1)), 1, "keeping the second"),  # a tie: the new one
        (refused("No."), 1, "could not be asked for again"),
        (server_error(500), 1, "could not be asked for again"),
    ],
    ids=["worse", "as-good", "refused", "server-error"],
)
async def test_the_second_conversation_is_kept_only_when_it_covers_at_least_as_many_terms(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    logs: LogLines,
    second: Scripted,
    kept_leave_out: int,
    said: str,
) -> None:
    openai_fake.script(
        reply("K"), reply("T"), reply("V1"), completion(conversation(0, leave_out=1)), second,
        reply("V2"), reply("C2"),
    )  # fmt: skip
    result = await new_job().attempt()
    script = json.loads(result["lessons"][0]["chat_content"])
    assert script == conversation(0, leave_out=kept_leave_out)
    assert logs.find(said)
    assert openai_fake.calls == 7


async def test_every_conversation_short_stays_within_the_call_bound(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, logs: LogLines
) -> None:
    shorts = [completion(conversation(t, leave_out=4)) for t in (0, 1) for _ in range(2)]
    openai_fake.script(
        reply("K"), reply("T"), reply("V1"), *shorts[:2], reply("V2"), *shorts[2:]
    )  # fmt: skip
    result = await new_job().attempt()
    assert openai_fake.calls == gl.max_calls(2) == 8  # one more ask per conversation, no more
    assert all(json.loads(row["chat_content"]) for row in result["lessons"])
    assert logs.find("Lessons done: 8 OpenAI calls (at most 8 for 2 topics)")


async def test_a_rate_limit_on_the_second_ask_resumes_there_without_asking_the_first_again(
    new_job: Callable[..., ProcessorJob],
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
) -> None:
    openai_fake.script(
        reply("K"), reply("T"), reply("V1"), completion(conversation(0, leave_out=2)),
        rate_limited(retry_after_s=2), reply("C1"), reply("V2"), reply("C2"),
    )  # fmt: skip
    job = new_job()
    with pytest.raises(RateLimited):
        await job.attempt(1)
    assert "chat_first:0" in await job.state()
    await lift_openai_cooldown(job.redis, stand_in_env)  # parked until its Retry-After passed
    result = await job.attempt(1)
    assert steps_called(openai_fake) == ["K", "T", "V", "C", "C", "C", "V", "C"]
    assert json.loads(result["lessons"][0]["chat_content"]) == conversation(0)
    assert_written_once(db)


def test_coverage_threshold_and_missing_terms() -> None:
    terms = ["heart rate", "valve", "biopsy", "tissue", "arrhythmia"]
    chat = json.dumps({"conversation": [
        {"speaker": "Assistant", "message": "Your heart-rate is fine; the valves too."},
        {"speaker": "User", "message": "And the biopsies of that tissue?"},
    ]})  # fmt: skip
    missing = steps.conversation_missing(chat, terms)
    assert missing == ["arrhythmia"]
    assert steps.coverage(missing, terms) == 0.8 >= steps.COVERAGE_THRESHOLD  # not asked again
    assert steps.coverage(["valve", *missing], terms) < steps.COVERAGE_THRESHOLD
    assert steps.coverage([], []) == 1.0


# --- budget ------------------------------------------------------------------------------------


async def test_over_budget_part_way_fails_at_once_naming_the_rows_already_written(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    # $4.80 spent; the first vocabulary reply's 100k output tokens ($0.24) pass the allowance.
    db.tables["users"][0].update(input_tokens=0, output_tokens=2_000_000)
    openai_fake.script(
        reply("K"), reply("T"), completion(vocabulary(KEYWORDS[:4]), completion_tokens=100_000)
    )
    job = new_job()
    with pytest.raises(PermanentJobError) as caught:
        await job.attempt()
    message = str(caught.value)
    lesson = rows_of(db, "esp_lessons")[0]
    assert isinstance(caught.value.__cause__, OverBudget)
    assert message.startswith(OVER_BUDGET_MESSAGE)
    assert message.endswith(
        f"Lessons already saved and kept: esp_lessons {lesson['id']} "
        "(4 vocabulary rows, no conversation)."
    )
    assert openai_fake.calls == 3  # no call after the check failed
    assert len(rows_of(db, "esp_lessons")) == 1 and len(rows_of(db, "lesson_vocabulary")) == 4
    assert job.progress == [10, 20, 30, 46]


async def test_over_budget_before_the_first_call_says_only_that(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    db.tables["users"][0].update(input_tokens=0, output_tokens=2_100_000)
    with pytest.raises(OverBudget) as caught:
        await new_job().attempt()
    assert str(caught.value) == OVER_BUDGET_MESSAGE
    assert openai_fake.calls == 0 and rows_of(db, "esp_lessons") == []


# --- Supabase shape and configuration --------------------------------------------------------


async def test_a_lesson_id_column_that_is_not_a_uuid_fails_at_once_naming_it(
    new_job: Callable[..., ProcessorJob], openai_fake: FakeOpenAI, db: FakePostgrest
) -> None:
    body = {"code": "22P02", "details": None, "hint": None,
            "message": 'invalid input syntax for type bigint: "0b6d6c1e"'}  # fmt: skip
    db.fail("POST", LESSONS, status=400, body=body)
    openai_fake.script(reply("K"), reply("T"), reply("V1"))
    with pytest.raises(PermanentJobError, match=r"esp_lessons\.id must be a uuid column"):
        await new_job().attempt()


def test_supabase_is_required(stand_in_env: dict[str, str]) -> None:
    without = {k: v for k, v in stand_in_env.items() if not k.startswith("SUPABASE")}
    with pytest.raises(ConfigError) as caught:
        gl.build(without)
    assert caught.value.variable == "SUPABASE_URL"
    assert "esp_lessons" in str(caught.value)


def test_every_step_schema_comes_from_the_contract() -> None:
    defs = steps.load_step_defs(gl.JOB_NAME, gl.CONTRACT_RESULT_SCHEMA)
    for step in steps.STEPS:
        schema = step.schema(defs)
        assert schema["additionalProperties"] is False
        assert "title" not in schema
    conversation_schema = steps.CONVERSATION.schema(defs)
    speaker = conversation_schema["properties"]["conversation"]["items"]["properties"]["speaker"]
    assert speaker["enum"] == ["Assistant", "User"]


# --- clean-up units --------------------------------------------------------------------------


def test_clean_keywords_follows_interop() -> None:
    raw = ["Contract", "contract law", "  Offer ", "offer", "a", "2024", "1,000", "art",
           "heart", "Breach of Contract", 7, "", "Heart-rate"]  # fmt: skip
    assert steps.clean_keywords(raw) == [
        "contract law", "offer", "art", "breach of contract", "heart-rate",
    ]  # fmt: skip


def test_shape_topics_merges_small_topics_and_keeps_each_at_most_30() -> None:
    words = [f"w{i}" for i in range(50)]
    raw = [
        {"name": "Big", "keywords": words[:35]},  # split into 18 + 17
        {"name": "Tiny", "keywords": ["w35", "w36"]},  # merged into the largest with room
        {"name": " big ", "keywords": []},  # nothing left: dropped
        {"name": "Mid", "keywords": [*words[37:45], "W1", "invented"]},  # dup and unknown gone
        {"name": "", "keywords": ["w45", "w46", "w47"]},  # no name: the fallback
    ]
    shaped = steps.shape_topics(raw, words, "Medicine")
    sizes = {t["name"]: len(t["keywords"]) for t in shaped}
    # w48, w49 were not placed: they joined the fallback topic, which was big enough.
    assert sizes == {"Big": 20, "Big (2)": 17, "Mid": 8, "Medicine": 5}
    assert sorted(k for t in shaped for k in t["keywords"]) == sorted(words)
    assert all(len(t["keywords"]) <= steps.MAX_KEYWORDS_PER_TOPIC for t in shaped)


def test_shape_topics_with_too_few_keywords_keeps_one_topic() -> None:
    shaped = steps.shape_topics([{"name": "A", "keywords": ["x1"]}], ["x1", "x2"], "F")
    assert shaped == [{"name": "A", "keywords": ["x1", "x2"]}]


def test_clean_vocabulary_drops_empty_and_repeated_terms() -> None:
    items = [
        {"english_term": " Heart ", "definition": "d", "native_translation": "corazón",
         "example_sentence_target": "e", "example_sentence_native": "n"},
        {"english_term": "heart", "definition": "x", "native_translation": "x",
         "example_sentence_target": "x", "example_sentence_native": "x"},
        {"english_term": " ", "definition": "x", "native_translation": "x",
         "example_sentence_target": "x", "example_sentence_native": "x"},
    ]  # fmt: skip
    cleaned = steps.clean_vocabulary(items, english=True)
    assert [c["english_term"] for c in cleaned] == ["Heart"]


# --- the real service ----------------------------------------------------------------------------


async def test_service_completes_and_writes_the_idempotency_entry(
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
    node6: NodeBridge,
    redis_url: str,
    queue_name: str,
    rclient: aioredis.Redis,
) -> None:
    script_all(openai_fake)
    data = payload(content=f"{CONTENT} ({uuid.uuid4().hex})")
    key = idempotency_key(gl.JOB_NAME, data)
    registry = Registry()
    registry.register(gl.build(stand_in_env))
    try:
        async with running_service(settings_for(redis_url, queue_name), registry):
            added = await node6.add(queue_name, gl.JOB_NAME, data, opts={"idempotencyKey": key})
            job = await node6.wait_finished(queue_name, added["id"], timeout_ms=20000)
        assert job["state"] == "completed", job["failedReason"]
        assert job["progress"] == 100 and job["attemptsMade"] == 1
        assert await node6.validate("result", gl.JOB_NAME, job["returnvalue"]) == {
            "valid": True,
            "errors": [],
        }
        cached = json.loads(await rclient.get(key))
        assert list(cached) == ["jobId", "result", "cachedAt"]
        assert cached["jobId"] == added["id"] and cached["result"] == job["returnvalue"]
        assert job["returnvalue"]["tokenUsage"] == TOTAL_TOKENS
        state_key = f"bull:{queue_name}:{added['id']}:py-state"
        assert 0 < await rclient.ttl(state_key) <= RESULT_TTL_S
        assert_written_once(db)
    finally:
        await rclient.delete(key)


def worker_env(redis_url: str, queue: str, stand_in_env: dict[str, str]) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url, "WORKER_QUEUE": queue, "WORKER_HEALTH_PORT": "0",
        "WORKER_JOB_TYPES": gl.JOB_NAME, "WORKER_LOCK_DURATION_MS": "2000",
        "WORKER_STALLED_INTERVAL_MS": "2000",
        # Several kills of one job: each recovery counts as a stall, not as an attempt.
        "WORKER_MAX_STALLED_COUNT": "10",
        **stand_in_env,
    }  # fmt: skip


class KilledWorker:
    """`python -m worker`, killed with SIGKILL whenever a test says, and started again."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: WorkerProcess | None = None
        self.outputs: list[str] = []
        self.kills = 0

    async def start(self) -> None:
        self.proc = await WorkerProcess.start(self.env)
        await self.proc.wait_for_line("waiting for jobs")

    async def kill_when(self, condition: Callable[[], bool]) -> None:
        await eventually(_sync(condition), timeout=30)
        assert self.proc is not None
        await self.proc.kill()
        self.outputs.append(self.proc.output)
        self.kills += 1
        await self.start()

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.kill()
            self.outputs.append(self.proc.output)

    @property
    def output(self) -> str:
        return "\n".join(self.outputs)

    def explain(self, job: dict[str, Any], openai_fake: FakeOpenAI, db: FakePostgrest) -> str:
        """What a failed assertion shows: the job, the calls, the rows, every worker's output."""
        fields = ("state", "failedReason", "attemptsMade", "stalledCounter")
        return (
            f"job: { {k: job.get(k) for k in fields} }\ncalls: {steps_called(openai_fake)}\n"
            f"lessons: {rows_of(db, 'esp_lessons')}\n"
            f"vocabulary rows: {len(rows_of(db, 'lesson_vocabulary'))}\n{self.output}"
        )


def _sync(condition: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return condition()

    return check


HOLD_S = 120.0  # a held reply is never answered: the worker is killed while it waits


@pytest.mark.slow
async def test_kill_9_between_the_ai_steps_resumes_without_paying_twice(
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
    node6: NodeBridge,
    redis_url: str,
    queue_name: str,
) -> None:
    # Held (never answered) before T, before C1 and before V2: three kills, each after the
    # previous step's result was saved.
    held = {"T", "C1", "V2"}
    replies: list[Scripted] = []
    for label in ORDER:
        if label in held:
            replies.append(slow(HOLD_S, reply(label)))
        replies.append(reply(label))
    openai_fake.script(*replies)
    worker = KilledWorker(worker_env(redis_url, queue_name, stand_in_env))
    await worker.start()
    try:
        added = await node6.add(queue_name, gl.JOB_NAME, payload())
        for number, scripted in enumerate(replies, start=1):
            if scripted.delay_s:  # the request that gets this reply is the number-th call
                await worker.kill_when(lambda n=number: openai_fake.calls >= n)
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=60000)
    finally:
        await worker.stop()
    why = worker.explain(job, openai_fake, db)
    assert job["state"] == "completed", why
    assert job["attemptsMade"] == 1 and job["stalledCounter"] == worker.kills == 3, why
    # Each step answered once; the held requests were never answered (nor billed).
    assert Counter(steps_called(openai_fake)) == {"K": 1, "T": 2, "V": 3, "C": 3}, why
    assert len(db.rpc_calls("increment_tokens")) == len(ORDER)
    assert job["returnvalue"]["tokenUsage"] == TOTAL_TOKENS
    assert_written_once(db)
    assert job["returnvalue"]["lessons"] == rows_of(db, "esp_lessons")
    assert worker.output.count("Resuming from the saved state") == 3


@pytest.mark.slow
async def test_kill_9_in_the_supabase_crash_windows_writes_each_row_once(
    openai_fake: FakeOpenAI,
    db: FakePostgrest,
    stand_in_env: dict[str, str],
    node6: NodeBridge,
    redis_url: str,
    queue_name: str,
) -> None:
    script_all(openai_fake)
    # Each write is carried out, and its answer held until the worker is dead.
    for method, path in (("POST", LESSONS), ("POST", VOCABULARY), ("PATCH", LESSONS)):
        db.fail(method, path, status=500, after_write=True, delay_s=HOLD_S)
    worker = KilledWorker(worker_env(redis_url, queue_name, stand_in_env))
    await worker.start()
    try:
        added = await node6.add(queue_name, gl.JOB_NAME, payload())
        await worker.kill_when(lambda: len(rows_of(db, "esp_lessons")) == 1)
        await worker.kill_when(lambda: len(rows_of(db, "lesson_vocabulary")) == 4)
        await worker.kill_when(lambda: bool(rows_of(db, "esp_lessons")[0]["chat_content"]))
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=60000)
    finally:
        await worker.stop()
    why = worker.explain(job, openai_fake, db)
    assert job["state"] == "completed", why
    assert job["stalledCounter"] == 3 and job["attemptsMade"] == 1, why
    assert openai_fake.calls == len(ORDER), why  # no AI call repeated
    assert_written_once(db)
    lessons = rows_of(db, "esp_lessons")
    assert job["returnvalue"]["lessons"] == lessons
    assert all(row["chat_content"] for row in lessons)
    # The adopted rows were found by the id recorded before the insert, not inserted again.
    upserts = db.rest_requests("POST", LESSONS)
    assert [r.body["id"] for r in upserts][:2] == [lessons[0]["id"]] * 2


def test_the_step_prompts_keep_the_rules_the_node_prompts_gave() -> None:
    # Issue 18: the rules back in each stable prefix (and checked in code, tests above).
    def text(prompt: str) -> str:
        return " ".join(prompt.split())

    assert "only terms that occur in the document" in text(steps.KEYWORDS_PROMPT)
    assert "rather than pad the list" in text(steps.KEYWORDS_PROMPT)
    for prompt in (steps.VOCABULARY_ENGLISH_PROMPT, steps.VOCABULARY_OTHER_PROMPT):
        assert "one entry for each term given, in the given order, and no other terms" in text(
            prompt
        )
    assert "Use every one of the lesson's terms at least once" in text(steps.CONVERSATION_PROMPT)
    assert all("{" not in step.system_prompt for step in steps.STEPS)
