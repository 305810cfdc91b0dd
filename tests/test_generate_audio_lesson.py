"""generate-audio-lesson end to end: the Node package's enqueue, the real service and BullMQ, the
real boto3 against the Polly stand-in and moto's S3 server, the Supabase stand-in's tables."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from loguru import logger

from processors import build_registry
from processors import generate_audio_lesson as gal
from processors.shared import mp3
from processors.shared.audio_store import NOT_ALLOWED, USAGE_FUNCTION
from tests.fakes.aws_fixtures import Bucket, aws_variables
from tests.fakes.fixtures import Tables
from tests.fakes.polly_server import FakePolly, held, refused, server_error, throttled
from tests.fakes.postgrest_server import FakePostgrest, RpcSpec
from tests.support.harness import eventually, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from worker.errors import JobTypeDisabled, ProviderMissing
from worker.registry import Registry
from worker.service import Service

USER_ID = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"
LESSON_ID = "5d1c9e8a-3b7f-4c2d-9a6e-1f0b2c3d4e5f"
CHAT = {"conversation": [{"speaker": "Assistant", "message": "Where does it hurt"},
                         {"speaker": "User", "message": "My heart rate is high!"}]}  # fmt: skip
LESSON = {"id": LESSON_ID, "user_id": USER_ID, "title": "Medicine - Cardiology",
          "subject": "Medicine", "source_pdf_name": "cardio.pdf", "native_language": "Spanish",
          "chat_content": json.dumps(CHAT)}  # fmt: skip
WORDS = [
    {"lesson_id": LESSON_ID, "keywords": "heart rate", "definition": "beats per minute",
     "native_translation": "frecuencia cardiaca", "example_sentence_target": "Her heart rate rose.",
     "example_sentence_native": "Su frecuencia cardiaca subió."},
    {"lesson_id": LESSON_ID, "keywords": "valve", "definition": "a flap that controls flow.",
     "native_translation": "válvula", "example_sentence_target": "The valve was repaired",
     "example_sentence_native": "Repararon la válvula."},
]  # fmt: skip
# What Polly is sent: the script's lines (sentences) packed into one chunk.
SCRIPT = (
    "Medicine - Cardiology. heart rate. beats per minute. Her heart rate rose. valve. "
    "a flap that controls flow. The valve was repaired. Where does it hurt. "
    "My heart rate is high!"
)


@pytest.fixture
def db_tables() -> Tables:
    return {"esp_lessons": [dict(LESSON)], "lesson_vocabulary": [dict(w) for w in WORDS],
            "audio_lessons": []}  # fmt: skip


def allow(answer: Any = True) -> RpcSpec:
    return RpcSpec(("user_id",), lambda db, args: answer)


def env_of(db: FakePostgrest, aws_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**aws_env, "SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key,
            "PROTECTION_KEY_PREFIX": f"t{time.time_ns()}:", **extra}  # fmt: skip


class World:
    def __init__(self, db: FakePostgrest, polly: FakePolly, bucket: Bucket, queue: str,
                 service: Service) -> None:  # fmt: skip
        self.db, self.polly, self.bucket, self.queue, self.service = (
            db,
            polly,
            bucket,
            queue,
            service,
        )

    def metric(self, name: str, **labels: str) -> float | None:
        labels = {"queue": self.queue, "job_type": gal.JOB_NAME, "provider": "polly"} | labels
        return self.service.metrics.registry.get_sample_value(name, labels)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.db.tables["audio_lessons"]


class LogLines(list[str]):
    def write(self, message: str) -> None:
        self.append(message.rstrip("\n"))


@pytest.fixture
def logs() -> Iterator[LogLines]:
    sink = LogLines()
    handler = logger.add(sink.write, level="INFO", format="{message}")
    yield sink
    logger.remove(handler)


@pytest_asyncio.fixture
async def world(
    db: FakePostgrest, polly: FakePolly, s3_bucket: Bucket, aws_env: dict[str, str],
    redis_url: str, queue_name: str,
) -> AsyncIterator[World]:  # fmt: skip
    db.functions[USAGE_FUNCTION] = allow()
    registry = Registry()
    registry.register(gal.build(env_of(db, aws_env)))
    async with running_service(settings_for(redis_url, queue_name), registry) as service:
        yield World(db, polly, s3_bucket, queue_name, service)


async def run(node: NodeBridge, queue: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    added = await node.contract_enqueue(queue, gal.JOB_NAME, data or payload())
    assert "id" in added, added
    assert added["id"].startswith(f"{gal.JOB_NAME}-")  # the web service's job id format
    return await node.wait_finished(queue, added["id"], timeout_ms=30000)


def payload(**extra: Any) -> dict[str, Any]:
    return {"lessonId": LESSON_ID, "userId": USER_ID, **extra}


async def test_reads_the_lesson_into_s3_and_writes_one_row(
    world: World, node6: NodeBridge, logs: LogLines
) -> None:
    job = await run(node6, world.queue)
    assert job["state"] == "completed", job
    row = job["returnvalue"]
    assert (await node6.validate("result", gal.JOB_NAME, row))["valid"]
    assert world.rows == [row]
    assert world.db.rpc_calls(USAGE_FUNCTION) == [{"user_id": USER_ID}]
    # Polly: the script, in the default voice, one chunk; billed characters in the metrics.
    (body,) = world.polly.bodies
    assert body["Text"] == SCRIPT
    assert (body["VoiceId"], body["Engine"], body["LanguageCode"]) == ("Joanna", "neural", "en-US")
    assert (body["OutputFormat"], body["SampleRate"]) == ("mp3", "24000")
    assert world.metric("worker_provider_usage_total", unit="characters-neural") == len(SCRIPT)
    assert world.metric("worker_provider_cost_usd_total") == pytest.approx(len(SCRIPT) * 16e-6)
    assert any(f"Polly: {len(SCRIPT)} characters (characters-neural)" in line and "~$" in line
               for line in logs)  # fmt: skip
    # One private object at the INTEROP key, its frames valid, its duration the row's.
    (key,) = world.bucket.keys()
    assert key == row["audio_file_path"]
    assert key.startswith(f"audio-lessons/{USER_ID}/{LESSON_ID}-") and key.endswith(".mp3")
    audio, got = world.bucket.read(key)
    assert got["ContentType"] == "audio/mpeg"
    stream = mp3.parse(audio)
    assert stream.frame_count == len(SCRIPT) and stream.frames == audio
    assert row["audio_duration"] == pytest.approx(len(SCRIPT) * 0.024)
    assert row["status"] == "completed" and row["title"] == LESSON["title"]
    acl = world.bucket.client.get_object_acl(Bucket=world.bucket.name, Key=key)
    assert not any("AllUsers" in str(g["Grantee"]) for g in acl["Grants"])  # private
    async with aiohttp.ClientSession() as http, http.get(row["audio_url"]) as response:
        assert response.status == 200 and await response.read() == audio  # presigned GET
    assert "X-Amz-Expires=604800" in row["audio_url"]


async def test_a_language_picks_its_neural_voice_and_long_text_is_chunked(
    db: FakePostgrest, polly: FakePolly, s3_bucket: Bucket, aws_env: dict[str, str],
    redis_url: str, queue_name: str, node6: NodeBridge,
) -> None:  # fmt: skip
    sentence = "La frecuencia cardiaca sube con el ejercicio físico intenso. "
    long_words = [{**WORDS[0], "definition": sentence * 80}]  # ~4,900 characters
    db.tables["lesson_vocabulary"] = long_words
    registry = Registry()
    env = env_of(db, aws_env, AWS_S3_PUBLIC_BASE_URL="https://audio.example.com/")
    registry.register(gal.build(env))  # no can_create_audio_lesson here: said, and skipped
    async with running_service(settings_for(redis_url, queue_name), registry):
        job = await run(node6, queue_name, payload(language="Spanish"))
    assert job["state"] == "completed", job
    row = job["returnvalue"]
    assert len(polly.bodies) == 2 and {b["VoiceId"] for b in polly.bodies} == {"Lucia"}
    assert all(len(t) <= 2800 and t[-1] in ".!?" for t in polly.texts)  # whole sentences
    audio, _ = s3_bucket.read(row["audio_file_path"])
    assert mp3.parse(audio).frame_count == sum(len(t) for t in polly.texts)
    assert row["audio_duration"] == pytest.approx(sum(len(t) for t in polly.texts) * 0.024)
    assert row["audio_url"] == f"https://audio.example.com/{row['audio_file_path']}"


async def test_throttling_waits_without_using_an_attempt(world: World, node6: NodeBridge) -> None:
    world.polly.script(throttled())
    job = await run(node6, world.queue)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1 and world.polly.calls == 2  # boto3 itself did not retry
    first, second = (r for r in world.polly.requests if r.path == "/v1/speech")
    assert second.at - first.at >= 0.9
    assert len(world.rows) == 1 and len(world.bucket.keys()) == 1


async def test_a_polly_server_error_is_retried_into_the_same_object_and_row(
    world: World, node6: NodeBridge
) -> None:
    world.polly.script(server_error())
    job = await run(node6, world.queue)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 2 and world.polly.calls == 2
    assert len(world.rows) == 1 and len(world.bucket.keys()) == 1


class NoListBucket:
    """The processor's S3 client under an IAM policy without s3:ListBucket: S3 answers the HEAD
    of a missing key with 403 instead of 404."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.heads = 0

    def head_object(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        self.heads += 1
        try:
            return self.client.head_object(**kwargs)
        except ClientError as exc:
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 404:
                raise
            forbidden = {"Error": {"Code": "403", "Message": "Forbidden"},
                         "ResponseMetadata": {"HTTPStatusCode": 403}}  # fmt: skip
            raise ClientError(forbidden, "HeadObject") from None  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("polly_fails_once", [False, True])
async def test_without_list_bucket_a_missing_object_is_made_not_a_credentials_failure(
    world: World, node6: NodeBridge, polly_fails_once: bool
) -> None:
    processor = world.service.registry.get(gal.JOB_NAME).handler.__self__  # type: ignore[attr-defined]
    s3 = processor.s3 = NoListBucket(processor.s3)
    if polly_fails_once:
        world.polly.script(server_error())
    job = await run(node6, world.queue)
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1 + polly_fails_once, job
    # The first run made the key: nothing to look for. The retry looks, and 403 is "absent".
    assert s3.heads == int(polly_fails_once)
    assert len(world.rows) == 1 and len(world.bucket.keys()) == 1


async def test_text_polly_refuses_fails_at_once_with_one_failed_row(
    world: World, node6: NodeBridge
) -> None:
    world.polly.script(refused("TextLengthExceededException", "Maximum text length exceeded"))
    job = await run(node6, world.queue)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "TextLengthExceededException" in job["failedReason"]
    (row,) = world.rows
    assert row["status"] == "failed" and row["lesson_id"] == LESSON_ID
    assert row["user_id"] == USER_ID and row["audio_url"] is None
    assert world.bucket.keys() == []


async def test_a_missing_lesson_fails_at_once_naming_it(world: World, node6: NodeBridge) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    job = await run(node6, world.queue, payload(lessonId=missing))
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert job["failedReason"] == f"Lesson {missing} not found in esp_lessons"
    assert [r["status"] for r in world.rows] == ["failed"] and world.polly.calls == 0


async def test_usage_refused_fails_at_once(world: World, node6: NodeBridge) -> None:
    world.db.functions[USAGE_FUNCTION] = allow(False)
    job = await run(node6, world.queue)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert job["failedReason"] == NOT_ALLOWED and world.polly.calls == 0


async def test_bad_credentials_fail_at_once_naming_the_variables(
    db: FakePostgrest, polly: FakePolly, aws_env: dict[str, str], redis_url: str,
    queue_name: str, node6: NodeBridge, logs: LogLines,
) -> None:  # fmt: skip
    registry = Registry()
    registry.register(gal.build(env_of(db, aws_env, AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1")))
    async with running_service(settings_for(redis_url, queue_name), registry):
        job = await run(node6, queue_name)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "UnrecognizedClientException" in job["failedReason"]
    assert "AWS_ACCESS_KEY_ID" in job["failedReason"] and polly.calls == 1
    assert [r["status"] for r in db.tables["audio_lessons"]] == ["failed"]
    said = [line for line in logs if USAGE_FUNCTION in line]
    assert len(said) == 1 and "not limited" in said[0]  # the absent function, said once
    assert not any(aws_env["AWS_SECRET_ACCESS_KEY"] in line for line in logs)


async def test_without_variables_the_type_is_disabled(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    with pytest.raises(ProviderMissing) as missing:
        gal.build({"SUPABASE_URL": "https://x.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": "k"})
    sentence = missing.value.sentence
    assert sentence == ("generate-audio-lesson is disabled: AWS (Polly) is not configured "
                        "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")  # fmt: skip
    with pytest.raises(ProviderMissing, match="Supabase is not configured"):
        gal.build({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    registry = build_registry({}, ["ping", gal.JOB_NAME])
    assert registry.names() == ["ping"]
    assert "AWS (Polly) and Supabase" in registry.disabled[gal.JOB_NAME]
    with pytest.raises(JobTypeDisabled):
        registry.get(gal.JOB_NAME)
    async with running_service(settings_for(redis_url, queue_name), registry):
        job = await run(node6, queue_name)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert job["failedReason"] == registry.disabled[gal.JOB_NAME]


HOLD_S = 120.0  # a held reply is never answered: the worker is killed while it waits


@pytest.mark.slow
async def test_kill_9_during_polly_and_after_the_insert_leaves_one_object_and_one_row(
    db: FakePostgrest, polly: FakePolly, s3_server: str, s3_bucket: Bucket,
    redis_url: str, queue_name: str, node6: NodeBridge,
) -> None:  # fmt: skip
    db.functions[USAGE_FUNCTION] = allow()
    polly.script(held(HOLD_S))
    # The row is inserted, and the answer held until the worker is dead.
    db.fail("POST", "/rest/v1/audio_lessons", status=500, after_write=True, delay_s=HOLD_S)
    env = {
        "REDIS_URL": redis_url, "WORKER_QUEUE": queue_name, "WORKER_HEALTH_PORT": "0",
        "WORKER_JOB_TYPES": gal.JOB_NAME, "WORKER_LOCK_DURATION_MS": "2000",
        "WORKER_STALLED_INTERVAL_MS": "2000", "WORKER_MAX_STALLED_COUNT": "10",
        "SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key,
        "PROTECTION_KEY_PREFIX": f"t{time.time_ns()}:",
        **aws_variables(polly, s3_server, s3_bucket.name),
    }  # fmt: skip
    outputs: list[str] = []
    worker = await WorkerProcess.start(env)
    try:
        await worker.wait_for_line("waiting for jobs")
        added = await node6.contract_enqueue(queue_name, gal.JOB_NAME, payload())
        for condition in (lambda: polly.calls >= 1, lambda: len(db.tables["audio_lessons"]) == 1):
            await eventually(_true_when(condition), timeout=30)
            await worker.kill()
            outputs.append(worker.output)
            worker = await WorkerProcess.start(env)
            await worker.wait_for_line("waiting for jobs")
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=60000)
    finally:
        await worker.kill()
        outputs.append(worker.output)
    why = f"job: {job}\n" + "\n".join(outputs)
    assert job["state"] == "completed", why
    assert job["attemptsMade"] == 1 and job["stalledCounter"] == 2, why
    (key,) = s3_bucket.keys()
    (row,) = db.tables["audio_lessons"]
    assert job["returnvalue"] == row and row["audio_file_path"] == key, why
    assert polly.calls == 2, why  # the held call, then one more; none after the upload
    audio, _ = s3_bucket.read(key)
    assert mp3.parse(audio).duration_s == pytest.approx(row["audio_duration"], abs=1e-3)


def _true_when(condition: Any) -> Any:
    async def check() -> bool:
        return bool(condition())

    return check
