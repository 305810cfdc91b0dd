"""Migration, measured: the Node BullMQ worker and this one consume one queue side by side.

What the README's migration runbook rests on: while both run, every job the web service adds is
processed exactly once, by one of the two, and its result reads back the way the web service
reads it (`job.returnvalue` through bullmq's `queue.getJob`).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.harness import running_service, settings_for
from tests.support.node_bridge import NodeBridge

JOBS = 150
LIMITER = {"max": 10, "duration": 1000}  # the web service's worker setting, queue-wide


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_node_and_python_workers_share_the_queue_each_job_once(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # The old worker's figures (INTEROP §1): concurrency 20 now, the shared 10 jobs/s limiter.
    await node6.start_worker(queue_name, concurrency=20, limiter=LIMITER)
    settings = settings_for(redis_url, queue_name)  # ours: concurrency 3, limiter 10/1000
    try:
        async with running_service(settings) as service:
            # Kept after completion so all 150 can be read back (the web default keeps 100).
            jobs = [
                {"name": "ping", "data": {"echo": i}, "opts": {"removeOnComplete": False}}
                for i in range(JOBS)
            ]
            ids = (await node6.add_bulk(queue_name, jobs))["ids"]
            finished = await asyncio.gather(
                *(node6.wait_finished(queue_name, job_id, timeout_ms=60_000) for job_id in ids)
            )
            python_completed = service.stats.succeeded
    finally:
        by_node = await node6.stop_worker(queue_name)

    assert [job["state"] for job in finished] == ["completed"] * JOBS
    assert all(job["attemptsMade"] == 1 for job in finished), "a job ran twice or was retried"
    assert [job["returnvalue"]["echo"] for job in finished] == list(range(JOBS))
    assert all(job["returnvalue"]["jobId"] == job["id"] for job in finished)
    ran_on_node = {
        job["id"] for job in finished if job["returnvalue"]["worker"] == {"runtime": "node"}
    }
    assert ran_on_node == set(by_node["jobIds"]) and len(by_node["jobIds"]) == len(ran_on_node)
    # Exactly once: the two workers' counts add up to the jobs, and both took a share.
    assert by_node["completed"] + python_completed == JOBS, (by_node["completed"], python_completed)
    assert by_node["completed"] > 0 and python_completed > 0
    print(f"side by side: Node {by_node['completed']}, Python {python_completed} of {JOBS}")
