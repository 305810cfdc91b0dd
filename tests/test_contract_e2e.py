"""Contract tests across the process boundary (issue 3, point 4), against real Redis.

For every job type and every payload example in `contract/<job>/examples/payload/`:

- valid: the Node contract package enqueues it (`enqueue`, through the bridge on bullmq 6), the
  real Python service processes it, and Node reads the job back and validates `returnvalue`
  with ajv against the result schema;
- invalid: Node's validator refuses it (nothing reaches Redis); forced into the queue anyway
  with a plain `queue.add`, the worker fails it at once with a reason naming the example's `path`.

External services are stood in for by local servers speaking their HTTP APIs (`tests/fakes`).
A job type the worker cannot run here (no processor yet, or no stand-ins) is skipped, with the
reason in the test report. One service on one queue serves the whole module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import processors
from processors import ping as ping_module
from processors.shared import url_fetch
from processors.shared.recording import wav_bytes
from tests.fakes.aws_fixtures import aws_variables, new_bucket
from tests.fakes.azure_speech_server import KEY as AZURE_SPEECH_KEY
from tests.fakes.azure_speech_server import FakeAzureSpeech
from tests.fakes.azure_vision_server import KEY as AZURE_VISION_KEY
from tests.fakes.azure_vision_server import FakeAzureVision, read_result
from tests.fakes.fixtures import check_openai, stand_ins, users_table
from tests.fakes.openai_server import completion
from tests.fakes.polly_server import FakePolly
from tests.support.harness import running_service, settings_for, unique_queue
from tests.support.node_bridge import NodeBridge
from worker.contract import Contract
from worker.errors import InvalidPayload
from worker.registry import Registry

REPO = Path(__file__).resolve().parents[1]
CONTRACT = Contract.load()
JOB_TIMEOUT_MS = 20_000

# --- the examples ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    job: str
    file: str
    document: Any
    path: str = ""  # invalid examples: the field the rejection must name ("" = the document)
    reason: str = ""  # invalid examples: why it must be rejected


def payload_examples(validity: str) -> list[Example]:
    found = []
    for job in CONTRACT.job_names():
        folder = CONTRACT.root / job / "examples" / "payload" / validity
        for file in sorted(folder.glob("*.json")):
            content = json.loads(file.read_text(encoding="utf-8"))
            if validity == "valid":
                found.append(Example(job, file.name, content))
            else:
                found.append(
                    Example(job, file.name, content["document"], content["path"], content["reason"])
                )
    return found


# --- which job types the worker can run here ----------------------------------------------------

# Job types whose processor has not landed, and where that work is tracked.
KNOWN_GAPS: dict[str, str] = {}

# The local servers each job type's processor talks to (modules under tests/fakes).
FAKES_NEEDED = {
    "ping": (),
    "generate-flashcards": ("openai_server", "postgrest_server"),
    "generate-lesson": ("openai_server", "postgrest_server"),
    "process-image": ("azure_vision_server", "postgrest_server"),
    "assess-pronunciation": ("azure_speech_server", "postgrest_server"),
    "generate-audio-lesson": ("polly_server", "aws_fixtures", "postgrest_server"),
    "create-simple-audio": ("polly_server", "aws_fixtures", "postgrest_server"),
}


def module_of(job: str) -> str:
    return job.replace("-", "_")


def gap(job: str) -> str | None:
    """Why the worker cannot process `job` in this module, or None when it can."""
    module = module_of(job)
    if module not in processors.MODULES and not (REPO / "processors" / f"{module}.py").is_file():
        return KNOWN_GAPS.get(job, f"no processor for {job} (processors/{module}.py)")
    if job not in FAKES_NEEDED:
        return f"{job}: a processor exists, but this module has no stand-ins for it yet"
    missing = [f for f in FAKES_NEEDED[job] if not (REPO / "tests" / "fakes" / f"{f}.py").is_file()]
    if missing:
        return f"{job}: stand-ins not in tests/fakes yet ({', '.join(missing)})"
    return None


RUNNABLE = [job for job in CONTRACT.job_names() if gap(job) is None]


def cases(examples: list[Example], *, needs_worker: bool) -> list[Any]:
    params = []
    for example in examples:
        reason = gap(example.job) if needs_worker else None
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(
            pytest.param(example, id=f"{example.job}/{Path(example.file).stem}", marks=marks)
        )
    return params


# --- stand-ins and the running service ---------------------------------------------------------

USER_ID = "6f1c2a0e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"  # the user of the examples

# A structured reply the real model could give (the fake checks it against the request's
# strict schema); non-ASCII on purpose, it must survive the trip back to Node.
FLASHCARDS_REPLY = {
    "flashcards": [
        {"front": front, "back": back, "topic": "Photosynthesis", "difficulty": "beginner",
         "example": f"The {front} matters.", "pronunciation": f"/{front}/"}
        for front, back in [("chlorophyll", "clorofila"), ("glucose", "glucosa"),
                            ("light energy", "energía lumínica"), ("leaf", "hoja"),
                            ("stoma", "estoma")]
    ]
}  # fmt: skip


def lesson_replies(document: dict[str, Any]) -> list[dict[str, Any]]:
    """What the model answers, step by step, for one generate-lesson job (one topic)."""
    from processors.generate_lesson import target_language
    from processors.shared.lesson_steps import ENGLISH_FIELDS, OTHER_FIELDS

    # Terms taken from the material itself: the processor drops keywords the text lacks.
    words = re.findall(r"\w{4,}|[\u3040-\u9fff]+", document["content"])
    terms = list(dict.fromkeys(words))[:5]
    english = target_language(document.get("targetLanguage")) == "English"
    fields = ENGLISH_FIELDS if english else OTHER_FIELDS
    vocabulary = [
        dict(zip(fields, (t, f"{t}: défini", f"{t} (ñ)", f"Ein {t}.", f"A {t}."), strict=True))
        for t in terms
    ]
    script = [  # uses every term, so the conversation is not asked for a second time
        {"speaker": "Assistant", "message": f"Was macht einen Vertrag bindend? {terms[0]}"},
        {"speaker": "User", "message": f"Angebot und Annahme — 契約: {', '.join(terms[1:])}."},
    ]
    return [
        {"keywords": terms},
        {"topics": [{"name": "Formación del contrato", "keywords": terms}]},
        {"vocabulary": vocabulary},
        {"conversation": script},
    ]


# `sleep-bounds` asks ping for 10 minutes; the round trip checks the contract, not the clock.
MAX_PING_SLEEP_S = 0.1


class _ShortSleeps:
    """`asyncio` for processors/ping.py, with sleeps capped at MAX_PING_SLEEP_S."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result: Any = None) -> Any:
        return await asyncio.sleep(min(delay, MAX_PING_SLEEP_S), result)


@dataclass
class World:
    """The module's queue, the service consuming it, and the stand-ins it talks to."""

    queue: str
    openai: Any = None  # tests.fakes.openai_server.FakeOpenAI
    db: Any = None  # tests.fakes.postgrest_server.FakePostgrest (and its Storage)
    azure_vision: Any = None  # tests.fakes.azure_vision_server.FakeAzureVision
    azure_speech: Any = None  # tests.fakes.azure_speech_server.FakeAzureSpeech
    env: dict[str, str] = field(default_factory=dict)

    def prepare(self, job: str, document: Any) -> None:
        """Script what the external services answer for one job of type `job`."""
        if job == "generate-flashcards":
            self.openai.script(completion(FLASHCARDS_REPLY))
        elif job == "generate-lesson":
            self.openai.script(*(completion(reply) for reply in lesson_replies(document)))
        elif job == "process-image":
            self.azure_vision.script(read_result("Fotosíntesis", "luz → azúcar"))
            if "storageBucket" in document:  # the user's upload, where the payload says
                path = document["storagePath"]
                self.db.storage.put(document["storageBucket"], path, b"\xff\xd8jpeg", "image/jpeg")
        elif job == "generate-audio-lesson":  # the user's lesson, which the job reads aloud
            lesson_id, user_id = document["lessonId"], document["userId"]
            self.db.tables["esp_lessons"].append(
                {"id": lesson_id, "user_id": user_id, "title": "Biología - Células",
                 "subject": "Biología", "native_language": "Spanish", "chat_content": None}
            )  # fmt: skip
            self.db.tables["lesson_vocabulary"].append(
                {"lesson_id": lesson_id, "keywords": "célula", "definition": "la unidad de vida",
                 "native_translation": "cell", "example_sentence_target": "La célula vive."}
            )  # fmt: skip
        elif job == "assess-pronunciation" and "audioFilePath" in document:
            bucket, path = document["audioFilePath"].split("/", 1)
            self.db.storage.put(bucket, path, SILENCE_WAV, "audio/wav")

    def check_stand_ins(self) -> None:
        if self.openai is not None:
            check_openai(self.openai)
            assert not self.openai.queue, "a scripted OpenAI reply was not used"
        if self.azure_vision is not None:
            assert not self.azure_vision.queue, "a scripted Azure Vision reply was not used"


def build_registry(jobs: list[str], env: dict[str, str]) -> Registry:
    """Each processor module's `build(env)`, as `processors.build_registry` does for MODULES."""
    registry = Registry()
    for job in jobs:
        registry.register(importlib.import_module(f"processors.{module_of(job)}").build(env))
    return registry


@pytest.fixture(scope="module")
async def world(redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    world = World(unique_queue("contract-e2e"))
    async with contextlib.AsyncExitStack() as stack:  # unwinds in reverse: service stops first
        if any(FAKES_NEEDED.get(job) for job in RUNNABLE):
            fakes = await stack.enter_async_context(stand_ins(users_table(USER_ID)))
            world.openai, world.db, world.env = fakes.openai, fakes.db, fakes.env
        if "process-image" in RUNNABLE:
            world.azure_vision = await stack.enter_async_context(FakeAzureVision())
            world.env |= {"AZURE_VISION_ENDPOINT": world.azure_vision.origin,
                          "AZURE_VISION_KEY": AZURE_VISION_KEY}  # fmt: skip
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(ping_module, "asyncio", _ShortSleeps())
        if "assess-pronunciation" in RUNNABLE:
            world.azure_speech = await stack.enter_async_context(FakeAzureSpeech())
            world.env |= {"AZURE_SPEECH_ENDPOINT": world.azure_speech.origin,
                          "AZURE_SPEECH_KEY": AZURE_SPEECH_KEY}  # fmt: skip
            # The examples' audioUrl hosts (cdn.example) do not exist: every URL is this WAV.
            patch.setattr(url_fetch, "download", _download_silence)
        if {"generate-audio-lesson", "create-simple-audio"} & set(RUNNABLE):
            world.db.tables["audio_lessons"] = []
            polly = await stack.enter_async_context(FakePolly())
            s3_server = request.getfixturevalue("s3_server")  # moto's S3, shared per session
            variables = aws_variables(polly, s3_server, new_bucket(s3_server).name)
            world.env |= variables
            for name, value in variables.items():  # botocore reads the endpoints from os.environ
                patch.setenv(name, value)
            patch.delenv("AWS_ENDPOINT_URL", raising=False)
        stack.push_async_callback(_delete_queue_keys, redis_url, world.queue)
        registry = build_registry(RUNNABLE, world.env)
        await stack.enter_async_context(
            running_service(settings_for(redis_url, world.queue), registry)
        )
        yield world


SILENCE_WAV = wav_bytes(array("h", bytes(16000)))  # 0.5 s of 16 kHz 16-bit mono silence


async def _download_silence(*args: Any, **kwargs: Any) -> bytes:
    return SILENCE_WAV


async def _delete_queue_keys(redis_url: str, queue: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"bull:{queue}:*", count=500):
            await client.delete(key)
    finally:
        await client.aclose()


async def forget_idempotency_entry(rclient: aioredis.Redis, job: dict[str, Any]) -> None:
    """Delete the entry the worker cached for `job` (only if it is still this job's)."""
    key = job["opts"].get("idempotencyKey")
    raw = await rclient.get(key) if key else None
    if raw is not None and json.loads(raw).get("jobId") == job["id"]:
        await rclient.delete(key)


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("example", cases(payload_examples("valid"), needs_worker=True))
async def test_valid_payload_round_trip(
    example: Example, world: World, node6: NodeBridge, rclient: aioredis.Redis
) -> None:
    world.prepare(example.job, example.document)
    added = await node6.contract_enqueue(world.queue, example.job, example.document)
    assert not added.get("rejected"), f"Node refused a valid example: {added.get('message')}"

    job = await node6.wait_finished(world.queue, added["id"], timeout_ms=JOB_TIMEOUT_MS)
    await forget_idempotency_entry(rclient, job)
    assert job["state"] == "completed", job["failedReason"]
    assert job["attemptsMade"] == 1
    verdict = await node6.validate("result", example.job, job["returnvalue"])
    assert verdict == {"valid": True, "errors": []}, job["returnvalue"]
    world.check_stand_ins()


@pytest.mark.parametrize("example", cases(payload_examples("invalid"), needs_worker=False))
async def test_node_refuses_invalid_payload(
    example: Example, node6: NodeBridge, queue_name: str
) -> None:
    answer = await node6.contract_enqueue(queue_name, example.job, example.document)
    assert answer.get("rejected"), f"Node enqueued {answer.get('id')}; must not: {example.reason}"
    assert example.path in [error["path"] for error in answer["errors"]], answer["errors"]
    counts = await node6.counts(queue_name)
    assert sum(n for state, n in counts.items() if state != "total") == 0, counts


@pytest.mark.parametrize("example", cases(payload_examples("invalid"), needs_worker=True))
async def test_worker_fails_forced_invalid_payload_at_once(
    example: Example, world: World, node6: NodeBridge
) -> None:
    # A plain queue.add with the web service's options (3 attempts): no validation on the way in.
    added = await node6.add(world.queue, example.job, example.document)
    job = await node6.wait_finished(world.queue, added["id"], timeout_ms=JOB_TIMEOUT_MS)
    assert job["state"] == "failed"
    assert job["attemptsMade"] == 1  # not retried
    named = f"Invalid payload for {example.job}: {example.path or '(payload)'}: "
    assert job["failedReason"].startswith(named), job["failedReason"]
    world.check_stand_ins()  # the processor never ran, so no external call was made


# Where the two validators parted: `pattern: "\\S"` ("must not be blank") ran on JavaScript's
# whitespace in ajv and on Python's in jsonschema, and the two sets differ: U+FEFF is whitespace
# only to JavaScript, U+001C..U+001F and U+0085 only to Python. The schema now lists JavaScript's
# whitespace character by character, so both judge these alike.
@pytest.mark.parametrize(
    "blank",
    ["\ufeff", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", " \ufeff\u3000", "\ufeffx"],
    ids=["U+FEFF", "U+001C", "U+001D", "U+001E", "U+001F", "U+0085", "spaces", "not-blank"],
)
async def test_node_and_python_agree_on_blank_content(blank: str, node6: NodeBridge) -> None:
    document = {"content": blank, "subject": "Biology", "topic": "Cells", "userId": USER_ID}
    node = await node6.validate("payload", "generate-flashcards", document)
    try:
        CONTRACT.validate_payload("generate-flashcards", document)
        python_valid = True
    except InvalidPayload:
        python_valid = False
    assert node["valid"] == python_valid, f"ajv: {node['valid']}, jsonschema: {python_valid}"
    # Blank is what JavaScript's \\s matches (the web service's ajv decided before the change).
    assert python_valid == any(ch not in " \ufeff\u3000" for ch in blank)
