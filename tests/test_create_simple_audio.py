"""create-simple-audio end to end: the Node package's enqueue, the real service and BullMQ, the
real boto3 against the Polly stand-in, Supabase Storage and tables on the Supabase stand-in."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from processors import create_simple_audio as csa
from processors.shared import mp3
from tests.fakes.aws_fixtures import aws_variables
from tests.fakes.fixtures import Tables
from tests.fakes.polly_server import FakePolly, Reply, held, refused, throttled
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.harness import eventually, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from worker.errors import ProviderMissing
from worker.registry import Registry

USER_ID = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"
SCRIPT = "¡Buenos días! ¿Cuánto cuestan las manzanas? Dos euros el kilo."
BUCKET = "Audio_Lessons"


@pytest.fixture
def db_tables() -> Tables:
    return {"audio_lessons": []}


def payload(**changes: Any) -> dict[str, Any]:
    return {"title": "En el mercado", "scriptText": SCRIPT, "userId": USER_ID,
            "nativeLanguage": "Spanish", **changes}  # fmt: skip


def env_of(db: FakePostgrest, aws: dict[str, str]) -> dict[str, str]:
    return {**aws, "SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key,
            "PROTECTION_KEY_PREFIX": f"t{time.time_ns()}:"}  # fmt: skip


@pytest_asyncio.fixture
async def queue(
    db: FakePostgrest, aws_env: dict[str, str], redis_url: str, queue_name: str
) -> AsyncIterator[str]:
    registry = Registry()
    registry.register(csa.build(env_of(db, aws_env)))
    async with running_service(settings_for(redis_url, queue_name), registry):
        yield queue_name


async def run(node: NodeBridge, queue: str, data: dict[str, Any]) -> dict[str, Any]:
    added = await node.contract_enqueue(queue, csa.JOB_NAME, data)
    assert added.get("id", "").startswith(f"{csa.JOB_NAME}-"), added
    return await node.wait_finished(queue, added["id"], timeout_ms=30000)


async def test_reads_the_text_into_storage_and_updates_its_row(
    db: FakePostgrest, polly: FakePolly, queue: str, node6: NodeBridge
) -> None:
    job = await run(node6, queue, payload())
    assert job["state"] == "completed", job
    row = job["returnvalue"]
    assert (await node6.validate("result", csa.JOB_NAME, row))["valid"]
    assert db.tables["audio_lessons"] == [row] and row["status"] == "completed"
    (first,) = db.rest_requests("POST", "/rest/v1/audio_lessons")
    assert first.body | {"id": row["id"]} == {"id": row["id"], "user_id": USER_ID,
            "title": "En el mercado", "status": "not_started", "audio_url": "pending"}  # fmt: skip
    (body,) = polly.bodies
    assert (body["VoiceId"], body["LanguageCode"], body["Text"]) == ("Lucia", "es-ES", SCRIPT)
    (path,) = db.storage.objects(BUCKET)
    assert path == row["audio_file_path"]
    assert path.startswith(f"{USER_ID}/{row['id']}-") and path.endswith(".mp3")
    stored = db.storage.get(BUCKET, path)
    assert stored is not None and stored.content_type == "audio/mpeg"
    assert mp3.parse(stored.data).frame_count == len(SCRIPT)
    assert row["audio_duration"] == pytest.approx(len(SCRIPT) * 0.024)
    async with aiohttp.ClientSession() as http, http.get(row["audio_url"]) as response:
        assert response.status == 200 and await response.read() == stored.data  # signed URL


async def test_a_long_text_is_read_in_chunks_into_one_mp3(
    db: FakePostgrest, polly: FakePolly, queue: str, node6: NodeBridge
) -> None:
    text = " ".join(f"Sentence number {i} is here to make the text long." for i in range(200))
    job = await run(node6, queue, payload(scriptText=text, nativeLanguage="klingon"))
    assert job["state"] == "completed", job
    assert len(polly.texts) == 4 and all(len(t) <= 2800 for t in polly.texts)
    assert " ".join(polly.texts) == text  # cut between sentences only
    assert {b["VoiceId"] for b in polly.bodies} == {"Joanna"}  # unknown language: the default
    stored = db.storage.get(BUCKET, job["returnvalue"]["audio_file_path"])
    frames = sum(len(t) for t in polly.texts)  # the stand-in's one frame per character
    assert stored is not None and mp3.parse(stored.data).frame_count == frames


async def test_a_retry_after_a_supabase_failure_resumes_without_polly_or_upload_again(
    db: FakePostgrest, polly: FakePolly, queue: str, node6: NodeBridge
) -> None:
    db.fail("PATCH", "/rest/v1/audio_lessons", status=503)  # the update, once
    job = await run(node6, queue, payload())
    assert job["state"] == "completed" and job["attemptsMade"] == 2, job
    assert polly.calls == 1 and len(db.tables["audio_lessons"]) == 1
    (stored,) = db.storage.objects(BUCKET).values()
    assert stored.writes == 1


async def test_text_polly_refuses_fails_at_once_and_marks_the_row_failed(
    db: FakePostgrest, polly: FakePolly, queue: str, node6: NodeBridge
) -> None:
    polly.script(refused())
    job = await run(node6, queue, payload())
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "Amazon Polly refused the request" in job["failedReason"]
    assert "InvalidSsmlException" in job["failedReason"]
    (row,) = db.tables["audio_lessons"]
    assert row["status"] == "failed" and db.storage.objects(BUCKET) == {}


@pytest.mark.parametrize(
    ("setting", "reply", "reason"),
    [
        ({"WORKER_JOB_TIMEOUT_S": 1}, held(30.0), "Job timed out after 1 s"),
        ({"WORKER_RATE_LIMIT_MAX_WAIT_S": 0}, throttled(), "WORKER_RATE_LIMIT_MAX_WAIT_S"),
    ],
)
async def test_a_job_failed_for_good_by_the_loop_marks_its_row_failed(
    db: FakePostgrest, polly: FakePolly, aws_env: dict[str, str], redis_url: str,
    queue_name: str, node6: NodeBridge, setting: dict[str, Any], reply: Reply, reason: str,
) -> None:  # fmt: skip
    """Failed for good where the processor cannot see it: cancelled by the job timeout on its
    last attempt, or parked past the rate-limit wait cap (the loop's, not the processor's)."""
    polly.script(reply)
    registry = Registry()
    registry.register(csa.build(env_of(db, aws_env)))
    async with running_service(settings_for(redis_url, queue_name, **setting), registry):
        added = await node6.contract_enqueue(queue_name, csa.JOB_NAME, payload(), {"attempts": 1})
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=30000)
    assert job["state"] == "failed" and reason in job["failedReason"], job
    (row,) = db.tables["audio_lessons"]
    assert row["status"] == "failed" and row["audio_url"] == "pending", row


def test_without_variables_the_type_is_disabled() -> None:
    with pytest.raises(ProviderMissing) as missing:
        csa.build({})
    assert missing.value.sentence == (
        "create-simple-audio is disabled: AWS (Polly) and Supabase are not configured (set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and SUPABASE_URL and "
        "SUPABASE_SERVICE_ROLE_KEY)"
    )


@pytest.mark.slow
async def test_kill_9_during_polly_leaves_one_object_and_one_row(
    db: FakePostgrest, polly: FakePolly, s3_server: str, redis_url: str, queue_name: str,
    node6: NodeBridge,
) -> None:  # fmt: skip
    polly.script(held(120.0))
    env = {
        "REDIS_URL": redis_url, "WORKER_QUEUE": queue_name, "WORKER_HEALTH_PORT": "0",
        "WORKER_JOB_TYPES": csa.JOB_NAME, "WORKER_LOCK_DURATION_MS": "2000",
        "WORKER_STALLED_INTERVAL_MS": "2000",
        **env_of(db, aws_variables(polly, s3_server, "unused")),
    }  # fmt: skip
    worker = await WorkerProcess.start(env)
    outputs = []
    try:
        await worker.wait_for_line("waiting for jobs")
        added = await node6.contract_enqueue(queue_name, csa.JOB_NAME, payload())

        async def polly_called() -> bool:
            return polly.calls >= 1

        await eventually(polly_called, timeout=30)
        await worker.kill()
        outputs.append(worker.output)
        worker = await WorkerProcess.start(env)
        job = await node6.wait_finished(queue_name, added["id"], timeout_ms=30000)
    finally:
        await worker.kill()
        outputs.append(worker.output)
    why = f"job: {job}\n" + "\n".join(outputs)
    assert job["state"] == "completed" and job["stalledCounter"] == 1, why
    (row,) = db.tables["audio_lessons"]
    (path,) = db.storage.objects(BUCKET)
    assert job["returnvalue"] == row and row["audio_file_path"] == path, why
    assert "Resuming from the saved state" in outputs[-1]
