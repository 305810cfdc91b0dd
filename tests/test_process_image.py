"""process-image end to end: the Node package's enqueue, the real service and BullMQ, the real
`azure-ai-vision-imageanalysis` SDK against a local Azure AI Vision stand-in."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from processors import build_registry
from processors import process_image as pi
from tests.fakes.azure_vision_server import (
    KEY,
    FakeAzureVision,
    image_too_large,
    rate_limited,
    read_result,
    server_error,
)
from tests.fakes.postgrest_server import FakePostgrest
from tests.support.harness import running_service, settings_for
from tests.support.node_bridge import NodeBridge
from worker.errors import JobTypeDisabled, ProviderMissing
from worker.registry import Registry
from worker.service import Service

USER_ID = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"


def payload() -> dict[str, Any]:
    return {"userId": USER_ID, "imageUrl": f"https://images.example/{time.time_ns()}.png"}


class World:
    def __init__(
        self, azure: FakeAzureVision, db: FakePostgrest, queue: str, service: Service
    ) -> None:
        self.azure = azure
        self.db = db
        self.queue = queue
        self.service = service

    def metric(self, name: str, **labels: str) -> float | None:
        labels = {"queue": self.queue, "job_type": pi.JOB_NAME, "provider": "azure-vision"} | labels
        return self.service.metrics.registry.get_sample_value(name, labels)


def env_for(
    azure: FakeAzureVision, key: str = KEY, db: FakePostgrest | None = None
) -> dict[str, str]:
    env = {
        "AZURE_VISION_ENDPOINT": azure.origin,
        "AZURE_VISION_KEY": key,
        "PROTECTION_KEY_PREFIX": f"t{time.time_ns()}:",
    }
    if db is not None:
        env |= {"SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key}
    return env


@pytest.fixture
async def world(redis_url: str, queue_name: str) -> AsyncIterator[World]:
    async with FakeAzureVision() as azure, FakePostgrest() as db:
        registry = Registry()
        registry.register(pi.build(env_for(azure, db=db)))
        async with running_service(settings_for(redis_url, queue_name), registry) as service:
            yield World(azure, db, queue_name, service)


async def run(node: NodeBridge, queue: str, data: dict[str, Any]) -> dict[str, Any]:
    added = await node.contract_enqueue(queue, pi.JOB_NAME, data)
    assert "id" in added, added
    assert added["id"].startswith(f"{pi.JOB_NAME}-")  # the web service's job id format
    return await node.wait_finished(queue, added["id"], timeout_ms=30000)


async def test_reads_the_text_end_to_end(world: World, node6: NodeBridge) -> None:
    world.azure.script(read_result("Photosynthesis", "light to sugar"))
    data = payload()
    job = await run(node6, world.queue, data)
    assert job["state"] == "completed", job
    result = job["returnvalue"]
    assert (await node6.validate("result", pi.JOB_NAME, result))["valid"]
    assert result["text"] == "Photosynthesis\nlight to sugar"
    assert [w["text"] for w in result["lines"][1]["words"]] == ["light", "to", "sugar"]
    assert result["lines"][0]["boundingPolygon"][0] == {"x": 10, "y": 10}
    (sent,) = world.azure.requests
    assert sent.body == {"url": data["imageUrl"]} and sent.param("features") == "read"
    assert sent.header("Ocp-Apim-Subscription-Key") == KEY
    # one image read, priced at the default $1.50 per 1,000
    assert world.metric("worker_provider_usage_total", unit="images") == 1
    assert world.metric("worker_provider_cost_usd_total") == pytest.approx(0.0015)


async def test_rate_limit_waits_without_using_an_attempt(world: World, node6: NodeBridge) -> None:
    world.azure.script(rate_limited(1), read_result("after the wait"))
    job = await run(node6, world.queue, payload())
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 1 and world.azure.calls == 2
    first, second = world.azure.requests
    assert second.at - first.at >= 0.9  # Retry-After waited out


async def test_server_error_is_retried(world: World, node6: NodeBridge) -> None:
    world.azure.script(server_error(500), read_result("second try"))
    job = await run(node6, world.queue, payload())
    assert job["state"] == "completed", job
    assert job["attemptsMade"] == 2 and world.azure.calls == 2  # the SDK itself did not retry


async def test_image_over_the_size_limit_fails_at_once(world: World, node6: NodeBridge) -> None:
    world.azure.script(image_too_large())
    job = await run(node6, world.queue, payload())
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "too large" in job["failedReason"] and "20 MB" in job["failedReason"]


def storage_payload(path: str = "scans/page-1.png") -> dict[str, Any]:
    return {"userId": USER_ID, "storageBucket": "uploads", "storagePath": f"{USER_ID}/{path}"}


async def test_reads_an_image_from_supabase_storage(world: World, node6: NodeBridge) -> None:
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    data = storage_payload()
    world.db.storage.put("uploads", data["storagePath"], image, "image/png")
    world.azure.script(read_result("Mitochondria", "the powerhouse"))
    job = await run(node6, world.queue, data)
    assert job["state"] == "completed", job
    assert job["returnvalue"]["text"] == "Mitochondria\nthe powerhouse"
    (sent,) = world.azure.requests
    # the bytes themselves went to Azure (its `analyze` with image data), not a URL
    assert sent.raw == image and sent.header("Content-Type") == "application/octet-stream"
    (read,) = world.db.rest_requests("GET", f"/storage/v1/object/uploads/{data['storagePath']}")
    assert read.header("apikey") == world.db.api_key


async def test_missing_storage_object_fails_at_once_naming_it(
    world: World, node6: NodeBridge
) -> None:
    data = storage_payload("gone.png")
    job = await run(node6, world.queue, data)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "no such object" in job["failedReason"] and data["storagePath"] in job["failedReason"]
    assert world.azure.calls == 0


async def test_storage_image_over_the_limit_is_refused_unread(
    world: World, node6: NodeBridge
) -> None:
    data = storage_payload("huge.png")
    world.db.storage.put("uploads", data["storagePath"], b"\0" * (21 * 1024 * 1024), "image/png")
    job = await run(node6, world.queue, data)
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "21 MB, over the 20 MB limit" in job["failedReason"], job["failedReason"]
    assert world.azure.calls == 0
    assert not world.db.rest_requests("GET", f"/storage/v1/object/uploads/{data['storagePath']}")


async def test_storage_outage_is_retried(world: World, node6: NodeBridge) -> None:
    data = storage_payload("flaky.png")
    world.db.storage.put("uploads", data["storagePath"], b"\x89PNG", "image/png")
    info = f"/storage/v1/object/info/uploads/{data['storagePath']}"
    world.db.fail("GET", info, 503, {"statusCode": "503", "error": "x", "message": "down"})
    job = await run(node6, world.queue, data)
    assert job["state"] == "completed" and job["attemptsMade"] == 2, job
    assert world.azure.calls == 1


async def test_storage_input_without_supabase_names_the_variables(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    async with FakeAzureVision() as azure:
        spec = pi.build(env_for(azure))
        assert any("imageUrl only" in note for note in spec.notes)
        registry = Registry()
        registry.register(spec)
        async with running_service(settings_for(redis_url, queue_name), registry):
            job = await run(node6, queue_name, storage_payload())
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "SUPABASE_URL" in job["failedReason"] and azure.calls == 0


async def test_bad_key_fails_at_once_naming_it(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    async with FakeAzureVision() as azure:
        registry = Registry()
        registry.register(pi.build(env_for(azure, key="wrong-key")))
        async with running_service(settings_for(redis_url, queue_name), registry):
            job = await run(node6, queue_name, payload())
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert "401" in job["failedReason"] and "AZURE_VISION_KEY" in job["failedReason"]
    assert azure.calls == 1


async def test_without_variables_the_type_is_disabled(
    redis_url: str, queue_name: str, node6: NodeBridge
) -> None:
    with pytest.raises(ProviderMissing) as missing:
        pi.build({"AZURE_VISION_ENDPOINT": "https://x.cognitiveservices.azure.com"})
    sentence = missing.value.sentence
    assert "AZURE_VISION_ENDPOINT and AZURE_VISION_KEY" in sentence
    registry = build_registry({}, ["ping", pi.JOB_NAME])  # start-up goes on
    assert registry.names() == ["ping"] and registry.disabled == {pi.JOB_NAME: sentence}
    with pytest.raises(JobTypeDisabled, match="process-image is disabled"):
        registry.get(pi.JOB_NAME)
    async with running_service(settings_for(redis_url, queue_name), registry):
        job = await run(node6, queue_name, payload())
    assert job["state"] == "failed" and job["attemptsMade"] == 1, job
    assert job["failedReason"] == sentence
