"""`generate-lesson`: lessons from a document, written to Supabase once, resumable (INTEROP §4).

Steps, each a strict structured-output call checked against `$defs` of the contract's result
schema, through OpenAI's shared breaker and rate limit (worker.providers), with the budget
reserved before and `increment_tokens` after every call (prompts and the
clean-up of replies: `processors.shared.lesson_steps`; progress on the left):

    10  keywords (temperature 0.1, as many as the content warrants) → those that do not
          occur in the content dropped → clean-up in code
    20  topics named in the native language (small ones merged, at most 30 keywords each)
    30  per topic: vocabulary (entries for terms not asked for dropped) → `esp_lessons` row
          → its `lesson_vocabulary` rows → conversation (temperature 0.7, max 2000 output
          tokens; asked for once more, naming the missing terms, when it uses fewer than
          COVERAGE_THRESHOLD of the lesson's terms) → `chat_content`
    100 `{"success": true, "lessons": [rows], "tokenUsage": <every call of the job>}`

So a job makes 2 + 2 × topics calls, at most 2 + 3 × topics; the count, and each
conversation's coverage of its terms, is logged (the result's shape stays as INTEROP has it).

Resumable and written once. Everything finished is recorded in a Redis hash at
`ctx.state_key` (`processors.shared.job_state`): each AI step's result together with its
token usage, and each lesson's id and row. A retry, a stalled-job recovery or a restart after
`kill -9` reads the hash and skips what is there, so no finished call is paid again. The rows:

- The `esp_lessons` id is made here (uuid4) and recorded with HSETNX *before* the insert, and
  the insert is `ON CONFLICT (id) DO NOTHING` plus a read by id. A crash between "row
  inserted" and "row recorded" therefore finds the same id on resume and adopts the row
  instead of writing a second one. This needs `esp_lessons.id` to be a uuid column that
  accepts a client's value (the usual Supabase `uuid default gen_random_uuid()`); a bigint
  identity id fails the first insert at once, naming the column, rather than duplicating.
  The alternative, a look-up by (user_id, title, source_pdf_name), was rejected: two jobs for
  the same file (a double click; lessons have no idempotency key) would adopt each other's rows.
- A lesson's `lesson_vocabulary` rows go in one INSERT, which Postgres applies wholly or not
  at all; on resume, one row with that `lesson_id` (an id unique to this job) means all are in.
- `chat_content` is an UPDATE by id: repeating it changes nothing.

On success the result goes into the hash too, whose TTL drops to an hour rather than the hash
being deleted: a crash between returning and BullMQ marking the job completed re-runs it, and
that run must answer from the hash, not start over and write every row again.

A conversation that cannot be generated (refused, cut off, empty, a 4xx) leaves the lesson
without one and says so in the log; a transient failure (5xx, timeout) is retried by BullMQ
(the retry resumes at that conversation) except on the last attempt, where the lesson is
kept without one too. Over budget part-way, or any final failure after rows were written,
the job fails with a reason that names the rows already saved.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from openai import AsyncOpenAI

from processors.shared.budget import Budget, OverBudget, estimate_tokens
from processors.shared.job_state import JobState
from processors.shared.lesson_steps import (
    CONVERSATION,
    COVERAGE_THRESHOLD,
    KEYWORDS,
    STEPS,
    TOPICS,
    VOCABULARY_ENGLISH,
    VOCABULARY_OTHER,
    Step,
    clean_keywords,
    clean_vocabulary,
    conversation_missing,
    conversation_text,
    coverage,
    ground_keywords,
    keep_asked_terms,
    keyword_range,
    load_step_defs,
    shape_topics,
    vocabulary_rows,
)
from processors.shared.lesson_store import LessonStore
from processors.shared.openai_client import OpenAISettings, complete_json, make_client
from processors.shared.supabase_client import KEY_VARIABLES, URL_VARIABLES, SupabaseSettings
from worker.context import JobContext
from worker.contract_types import LessonResult
from worker.errors import (
    ConfigProblems,
    Deferred,
    JobError,
    PermanentJobError,
    RetryableJobError,
)
from worker.providers import OPENAI, Provider, ProviderSettings
from worker.registry import ProcessorSpec

JOB_NAME = "generate-lesson"

DEFAULT_LANGUAGE = "English"
ENGLISH_ALIASES = frozenset({"english", "en", "en-gb", "en-us"})
DEFAULT_SOURCE = "Unknown Source"
DEFAULT_TOPIC = "General"
# The contract's result schema: its `$defs` are the one source of every step's reply shape.
CONTRACT_RESULT_SCHEMA = (
    Path(__file__).resolve().parent.parent / "contract" / JOB_NAME / "result.schema.json"
)


@dataclass(frozen=True)
class Lesson:
    """The payload with its defaults applied."""

    content: str
    subject: str
    topic: str
    user_id: str
    native_language: str
    target_language: str
    source_file_name: str

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Lesson:
        return cls(
            content=data["content"],
            subject=str(data["subject"]).strip(),
            topic=str(data["topic"]).strip(),
            user_id=data["userId"],
            native_language=_or(data.get("nativeLanguage"), DEFAULT_LANGUAGE),
            target_language=target_language(data.get("targetLanguage")),
            source_file_name=_or(data.get("sourceFileName"), DEFAULT_SOURCE),
        )

    @property
    def english_target(self) -> bool:
        return self.target_language == DEFAULT_LANGUAGE

    @property
    def fallback_topic(self) -> str:
        return self.topic or self.subject or DEFAULT_TOPIC

    def title(self, topic_name: str) -> str:
        return f"{self.subject} - {topic_name}"


def target_language(value: Any) -> str:
    """`English`, `en-GB` and the like all mean English (and pick the English field names)."""
    text = _or(value, DEFAULT_LANGUAGE)
    return DEFAULT_LANGUAGE if text.lower() in ENGLISH_ALIASES else text


def build(env: Mapping[str, str]) -> ProcessorSpec:
    """ConfigError without an OpenAI key or without Supabase (the lessons are written there):
    every problem at once, before any client is made."""
    problems = ConfigProblems()
    settings = problems.take(lambda: OpenAISettings.from_env(env))
    supabase = problems.take(lambda: SupabaseSettings.from_env(env))
    if supabase is None and not any(e.variable in (*URL_VARIABLES, *KEY_VARIABLES)
                                    for e in problems.errors):  # fmt: skip
        problems.add(
            URL_VARIABLES[-1],
            f"{JOB_NAME} writes esp_lessons rows: set {' or '.join(URL_VARIABLES)} "
            f"and {' or '.join(KEY_VARIABLES)}",
        )
    protection = problems.take(lambda: ProviderSettings.from_env(OPENAI, env))
    defs = problems.take(lambda: load_step_defs(JOB_NAME, CONTRACT_RESULT_SCHEMA))
    problems.raise_any()
    assert settings is not None and defs is not None and protection is not None
    budget = Budget.from_settings(supabase, protection.key_prefix)
    provider = Provider(protection, settings.model)
    processor = LessonProcessor(settings, make_client(settings), budget, defs, provider)
    return ProcessorSpec(
        name=JOB_NAME,
        handler=processor.run,
        description=f"lessons from a document into Supabase ({settings.model}, resumable)",
        notes=budget.notes,
        aclose=processor.aclose,
    )


class PartlySaved(PermanentJobError):
    """A permanent failure after rows were written; the message names them."""


class LessonProcessor:
    def __init__(
        self,
        settings: OpenAISettings,
        client: AsyncOpenAI,
        budget: Budget,
        defs: Mapping[str, Any],
        provider: Provider,
    ) -> None:
        assert budget.client is not None
        self.settings = settings
        self.client = client
        self.budget = budget
        self.provider = provider
        self.store = LessonStore(budget.client)
        self.schemas = {step.name: step.schema(defs) for step in STEPS}
        self.validators = {
            step.name: Draft202012Validator({"$defs": dict(defs), "$ref": step.ref})
            for step in STEPS
        }

    async def run(self, data: dict[str, Any], ctx: JobContext) -> LessonResult:
        lesson = Lesson.from_payload(data)  # validated against the contract by the runtime
        await ctx.progress(10)
        state = await JobState.load(ctx.redis, ctx.state_key)
        if (done := state.get("result")) is not None:
            ctx.log.info("Lessons already generated by an earlier run; returning its result")
            await ctx.progress(100)
            return done  # type: ignore[no-any-return]
        if not state.is_fresh:
            ctx.log.info("Resuming from the saved state: {}", describe_state(state))
        run = _Run(self, lesson, ctx, state)
        try:
            await state.settle_usage(run.account)  # a crash interrupted its accounting
            result = await run.execute()
        except Deferred:
            raise  # parked without using an attempt; the next run resumes here
        except PermanentJobError as exc:
            if saved := saved_rows(state):
                raise PartlySaved(f"{exc} {saved}") from exc
            raise
        except Exception as exc:
            if ctx.is_last_attempt and (saved := saved_rows(state)):
                raise RetryableJobError(f"{_reason(exc)} {saved}") from exc
            raise
        await state.finish(result)
        await ctx.progress(100)
        return result

    async def aclose(self) -> None:
        await self.client.close()
        await self.budget.aclose()


class _Run:
    """One run of one job: the steps, each skipped when the state says it is done."""

    def __init__(
        self, processor: LessonProcessor, lesson: Lesson, ctx: JobContext, state: JobState
    ) -> None:
        self.p = processor
        self.lesson = lesson
        self.ctx = ctx
        self.log = ctx.log
        self.state = state

    async def execute(self) -> LessonResult:
        keywords = await self.keywords()
        await self.ctx.progress(20)
        topics = await self.topics(keywords)
        await self.ctx.progress(30)
        for i, topic in enumerate(topics):
            await self.write_lesson(i, topic, len(topics))
            await self.ctx.progress(progress_at(2 * i + 1, len(topics)))
            await self.conversation(i)
            await self.ctx.progress(progress_at(2 * i + 2, len(topics)))
        lessons = [self.state.get(f"lesson:{i}") for i in range(len(topics))]
        self.log.info(
            "Lessons done: {} OpenAI calls (at most {} for {} topics)",
            self.state.calls,
            max_calls(len(topics)),
            len(topics),
        )
        return {"success": True, "lessons": lessons, "tokenUsage": self.state.tokens}

    # --- the AI steps ------------------------------------------------------------------------

    async def keywords(self) -> list[str]:
        if "keywords" in self.state:
            return list(self.state.get("keywords"))
        low, high = keyword_range(self.lesson.content)
        user = (
            f"Subject: {self.lesson.subject or '(not given)'}\n"
            f"Focus: {self.lesson.topic or '(the whole document)'}\n"
            f"Number of terms: between {low} and {high}, more for denser material\n\n"
            f"<document>\n{self.lesson.content}\n</document>"
        )

        def clean(reply: dict[str, Any]) -> list[str]:
            found, absent = ground_keywords(reply["keywords"], self.lesson.content)
            keywords = clean_keywords(found)
            self.log.info(
                "Keywords: {} from the model, {} not in the content{}, {} after clean-up",
                len(reply["keywords"]),
                len(absent),
                f" (dropped: {', '.join(absent)})" if absent else "",
                len(keywords),
            )
            if not keywords:
                raise PermanentJobError("No key terms could be found in this content.")
            return keywords

        result: list[str] = await self.ask(KEYWORDS, user, "keywords", clean)
        return result

    async def topics(self, keywords: list[str]) -> list[dict[str, Any]]:
        if "topics" in self.state:
            return list(self.state.get("topics"))
        user = (
            f"NATIVE language (topic names): {self.lesson.native_language}\n"
            f"Subject: {self.lesson.subject or '(not given)'}\n"
            f"Terms: {json.dumps(keywords, ensure_ascii=False)}"
        )

        def shape(reply: dict[str, Any]) -> list[dict[str, Any]]:
            topics = shape_topics(reply["topics"], keywords, self.lesson.fallback_topic)
            self.log.info(
                "Topics: {} from the model, {} after merging: {}",
                len(reply["topics"]),
                len(topics),
                ", ".join(f"{t['name']} ({len(t['keywords'])})" for t in topics),
            )
            return topics

        result: list[dict[str, Any]] = await self.ask(TOPICS, user, "topics", shape)
        return result

    async def vocabulary(self, i: int, topic: Mapping[str, Any]) -> list[dict[str, str]]:
        key = f"vocab:{i}"
        if key in self.state:
            return list(self.state.get(key))
        english = self.lesson.english_target
        user = (
            f"TARGET language: {self.lesson.target_language}\n"
            f"NATIVE language: {self.lesson.native_language}\n"
            f"Lesson: {self.lesson.title(topic['name'])}\n"
            f"Terms: {json.dumps(topic['keywords'], ensure_ascii=False)}"
        )
        step = VOCABULARY_ENGLISH if english else VOCABULARY_OTHER

        def clean(reply: dict[str, Any]) -> list[dict[str, str]]:
            entries = clean_vocabulary(reply["vocabulary"], english=english)
            kept, dropped = keep_asked_terms(entries, topic["keywords"], english=english)
            if dropped:
                self.log.info(
                    "Vocabulary of {}: {} entries not for the terms asked, dropped: {}",
                    topic["name"],
                    len(dropped),
                    ", ".join(dropped),
                )
            return kept

        result: list[dict[str, str]] = await self.ask(step, user, key, clean)
        return result

    async def conversation(self, i: int) -> None:
        lesson_id = self.state.get(f"lesson:{i}")["id"]
        key = f"chat:{i}"
        if key not in self.state:
            try:
                first = await self._first_conversation(i)
            except (Deferred, OverBudget):
                raise  # not the conversation's fault: the job waits, or fails naming the rows
            except PermanentJobError as exc:  # refused, cut off, empty, 4xx: the same again
                await self._without_conversation(i, lesson_id, exc)
            except Exception as exc:
                if not self.ctx.is_last_attempt:
                    raise  # BullMQ retries; the next run starts at this conversation
                await self._without_conversation(i, lesson_id, exc)
            else:
                await self._cover_terms(i, first)
        chat = self.state.get(key)
        if chat is None or self.state.get(f"chat_saved:{i}"):
            return
        row = await self.p.store.set_chat_content(str(lesson_id), chat)
        if row is None:
            self.log.warning(
                "Lesson {} vanished from esp_lessons before its conversation", lesson_id
            )
            row = {**self.state.get(f"lesson:{i}"), "chat_content": chat}
        await self.state.put({f"lesson:{i}": row, f"chat_saved:{i}": True})

    async def _first_conversation(self, i: int) -> str:
        """The first answer, kept apart from `chat:{i}` until its coverage is judged."""
        key = f"chat_first:{i}"
        if key in self.state:
            return str(self.state.get(key))
        chat: str = await self.ask(CONVERSATION, self._conversation_request(i), key,
                                   conversation_text)  # fmt: skip
        return chat

    async def _cover_terms(self, i: int, first: str) -> None:
        """Measure how many of the lesson's terms the conversation uses; below the threshold,
        ask once more naming the missing ones, and keep whichever answer uses more."""
        terms = self._terms(i)
        missing = conversation_missing(first, terms)
        share = coverage(missing, terms)
        title = self.state.get(f"lesson:{i}")["title"]
        self.log.info(
            "Conversation of {} uses {}/{} terms ({:.0%}){}",
            title,
            len(terms) - len(missing),
            len(terms),
            share,
            f"; missing: {', '.join(missing)}" if missing else "",
        )
        if share >= COVERAGE_THRESHOLD:
            await self.state.put({f"chat:{i}": first})
            return

        def better(reply: dict[str, Any]) -> str:
            second = conversation_text(reply)
            still = conversation_missing(second, terms)
            self.log.info(
                "Conversation of {} asked once more: uses {}/{} terms ({:.0%}), keeping the {}",
                title,
                len(terms) - len(still),
                len(terms),
                coverage(still, terms),
                "second" if len(still) <= len(missing) else "first",
            )
            return second if len(still) <= len(missing) else first

        request = (
            f"{self._conversation_request(i)}\n\n"
            f"An earlier version left out these terms: {json.dumps(missing, ensure_ascii=False)}."
            " Use every term, these too."
        )
        try:
            await self.ask(CONVERSATION, request, f"chat:{i}", better)
        except (Deferred, OverBudget):
            raise
        except Exception as exc:  # the first answer is usable: keep it rather than fail
            self.log.warning(
                "Conversation of {} could not be asked for again ({}); keeping the first",
                title,
                _reason(exc),
            )
            await self.state.put({f"chat:{i}": first})

    def _terms(self, i: int) -> list[str]:
        vocabulary = self.state.get(f"vocab:{i}") or []
        return [item.get("english_term") or item.get("target_term") for item in vocabulary]

    def _conversation_request(self, i: int) -> str:
        # Each term goes with its translation into the native language, which pins the sense
        # the lesson means (a heart valve, not a water valve). Node sent the definitions,
        # which do the same at several times the tokens: with them a lesson job cost 10.5 %
        # more than before issue 18 (bench/prompt_tokens.py, its five inputs), past the
        # issue's 10 % limit; with the translations, 4.9 % more.
        vocabulary = self.state.get(f"vocab:{i}") or []
        terms = "\n".join(
            f"- {item.get('english_term') or item.get('target_term')}: "
            f"{item.get('native_translation') or item.get('target_translation')}"
            for item in vocabulary
        )
        return (
            f"TARGET language: {self.lesson.target_language}\n"
            f"NATIVE language: {self.lesson.native_language}\n"
            f"Lesson: {self.state.get(f'lesson:{i}')['title']}\n"
            f"Terms, each with its NATIVE-language meaning:\n{terms}"
        )

    async def _without_conversation(self, i: int, lesson_id: Any, exc: BaseException) -> None:
        self.log.warning(
            "No conversation for lesson {} ({}): {}; the lesson is kept without one",
            lesson_id,
            self.state.get(f"lesson:{i}")["title"],
            _reason(exc),
        )
        await self.state.put({f"chat:{i}": None})

    async def ask(
        self, step: Step, user: str, key: str, transform: Callable[[dict[str, Any]], Any]
    ) -> Any:
        """Breaker and rate limit, budget hold, the call, and one write of its usage with its
        (transformed) result."""
        messages = [
            {"role": "system", "content": step.system_prompt},
            {"role": "user", "content": user},
        ]
        estimate = estimate_tokens(messages)
        failure: Exception | None = None
        values: dict[str, Any] = {}
        async with (
            self.p.provider.call(self.ctx.redis, estimate.total) as permit,
            self.p.budget.hold(self.ctx.redis, self.lesson.user_id, estimate, self.log) as held,
        ):
            reply = await complete_json(
                self.p.client,
                model=self.p.settings.model,
                messages=messages,
                schema_name=step.name,
                schema=self.p.schemas[step.name],
                temperature=step.temperature,
                max_completion_tokens=step.max_completion_tokens,
                prompt_cache_key=f"{JOB_NAME}:{step.name}",
                permit=permit,
            )
            usage = reply.usage
            self.log.info(
                "OpenAI {}: finish_reason {}, {} prompt tokens ({} cached) + {} completion tokens",
                step.name,
                reply.finish_reason,
                usage.prompt_tokens,
                usage.cached_tokens,
                usage.completion_tokens,
            )
            try:
                values[key] = transform(self._parsed(step, reply.parsed()))
            except Exception as exc:
                failure = exc
            self.ctx.ai_usage(self.p.settings.model, usage.prompt_tokens, usage.completion_tokens)
            # Billed whether or not the reply is usable: saved with the result, in one write.
            await self.state.record_call(
                usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, values
            )
            await self.state.settle_usage(self.account)
            await held.settle(usage.prompt_tokens, usage.completion_tokens)
        if failure is not None:
            raise failure
        return values[key]

    def _parsed(self, step: Step, data: dict[str, Any]) -> dict[str, Any]:
        error = best_match(self.p.validators[step.name].iter_errors(data))
        if error is not None:  # strict mode should make this impossible; a retry may help
            where = "/".join(str(p) for p in error.absolute_path) or "(reply)"
            raise RetryableJobError(f"OpenAI reply for {step.name} breaks its schema at {where}")
        return data

    async def account(self, input_tokens: int, output_tokens: int) -> None:
        await self.p.budget.record(self.lesson.user_id, input_tokens, output_tokens, self.log)

    # --- the rows ------------------------------------------------------------------------------

    async def write_lesson(self, i: int, topic: Mapping[str, Any], count: int) -> None:
        vocabulary = await self.vocabulary(i, topic)
        fresh = False
        row = self.state.get(f"lesson:{i}")
        if row is None:
            # Recorded before the insert: a crash after it finds this id and adopts the row.
            lesson_id, fresh = await self.state.put_new(f"lesson_id:{i}", str(uuid.uuid4()))
            row = await self.p.store.insert_lesson(
                {
                    "id": lesson_id,
                    "user_id": self.lesson.user_id,
                    "title": self.lesson.title(topic["name"]),
                    "subject": self.lesson.subject,
                    "source_pdf_name": self.lesson.source_file_name,
                    "native_language": self.lesson.native_language,
                    "chat_content": None,
                }
            )
            await self.state.put({f"lesson:{i}": row})
        lesson_id = str(row["id"])
        if f"words:{i}" not in self.state:
            rows = vocabulary_rows(lesson_id, vocabulary, english=self.lesson.english_target)
            # A lesson id made in this very run has no vocabulary yet; any other may have.
            if fresh or not await self.p.store.vocabulary_written(lesson_id):
                await self.p.store.insert_vocabulary(rows)
            await self.state.put({f"words:{i}": len(rows)})
        self.log.info(
            "Lesson {}/{} saved: {} ({}), {} vocabulary rows",
            i + 1,
            count,
            lesson_id,
            row["title"],
            self.state.get(f"words:{i}"),
        )


# --- progress and reasons ---------------------------------------------------------------------


def max_calls(topics: int) -> int:
    """Keywords, topics, and per topic vocabulary, a conversation and at most one more."""
    return 2 + 3 * topics


def progress_at(done: int, topics: int) -> int:
    """30 → 95 across the topics, two steps each (rows, then the conversation)."""
    return 30 + (65 * done) // (2 * topics)


def saved_rows(state: JobState) -> str:
    """What this job has written to Supabase, for a failure's reason ("" when nothing)."""
    parts = []
    i = 0
    while f"lesson_id:{i}" in state:
        row = state.get(f"lesson:{i}")
        if row is None:
            parts.append(f"{state.get(f'lesson_id:{i}')} (may have been saved)")
        else:
            words = state.get(f"words:{i}")
            vocabulary = "vocabulary not saved" if words is None else f"{words} vocabulary rows"
            chat = "conversation" if state.get(f"chat_saved:{i}") else "no conversation"
            parts.append(f"{row['id']} ({vocabulary}, {chat})")
        i += 1
    if not parts:
        return ""
    return f"Lessons already saved and kept: esp_lessons {'; '.join(parts)}."


def describe_state(state: JobState) -> str:
    lessons = sum(1 for name in state.fields if name.startswith("lesson:"))
    done = [name for name in ("keywords", "topics") if name in state]
    return f"{', '.join(done) or 'no step'} done, {lessons} lessons saved, {state.tokens} tokens"


def _or(value: Any, default: str) -> str:
    return value.strip() if isinstance(value, str) and value.strip() else default


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
