"""Helpers shared by the end-to-end tests of job types that call an optional provider
(process-image, assess-pronunciation): enqueue from Node and wait, the env, the metrics."""

from __future__ import annotations

import time
from typing import Any

from tests.fakes.postgrest_server import FakePostgrest
from tests.support.node_bridge import NodeBridge
from worker.service import Service


async def run_job(node: NodeBridge, queue: str, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Enqueue through the Node contract package, as the web service does, and await the end."""
    added = await node.contract_enqueue(queue, name, data)
    assert "id" in added, added
    assert added["id"].startswith(f"{name}-")  # the web service's job id format
    return await node.wait_finished(queue, added["id"], timeout_ms=30000)


def provider_env(db: FakePostgrest | None = None, **variables: str) -> dict[str, str]:
    """`variables`, a protection key prefix of the test's own, and Supabase when `db` is given."""
    env = variables | {"PROTECTION_KEY_PREFIX": f"t{time.time_ns()}:"}
    if db is not None:
        env |= {"SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key}
    return env


def provider_metric(
    service: Service, queue: str, job_type: str, provider: str, name: str, **labels: str
) -> float | None:
    """One sample of the service's /metrics for the job type and provider."""
    labels = {"queue": queue, "job_type": job_type, "provider": provider} | labels
    return service.metrics.registry.get_sample_value(name, labels)
