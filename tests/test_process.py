"""The real CLI in a subprocess: SIGTERM mid-job, kill -9 mid-job, logs without secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from typing import Any

import pytest

from tests.support.harness import eventually
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from tests.support.redis_server import private_redis

pytestmark = pytest.mark.slow


def worker_env(redis_url: str, queue: str, **extra: Any) -> dict[str, str]:
    # Only `ping`: these tests are about the service, and need no OpenAI stand-in.
    env = {
        "REDIS_URL": redis_url, "WORKER_QUEUE": queue, "WORKER_HEALTH_PORT": "0",
        "WORKER_JOB_TYPES": "ping",
    }  # fmt: skip
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def until_active(node: NodeBridge, queue: str, job_id: str) -> None:
    async def check() -> bool:
        job = await node.get_job(queue, job_id)
        return bool(job and job["state"] == "active")

    await eventually(check, timeout=20)


async def test_sigterm_lets_the_running_job_finish_and_exits_0(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    proc = await WorkerProcess.start(worker_env(redis_url, queue_name, WORKER_SHUTDOWN_GRACE_S=15))
    try:
        await proc.wait_for_line("waiting for jobs")
        added = await node.add(queue_name, "ping", {"sleepMs": 2500, "echo": "drain me"})
        waiting = await node.add(queue_name, "ping", {"echo": "not started"}, opts={"delay": 1500})
        await until_active(node, queue_name, added["id"])
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = await proc.wait(timeout=20)
    finally:
        await proc.kill()
    assert code == 0, proc.output
    assert time.monotonic() - sent < 15
    job = await node.get_job(queue_name, added["id"])
    assert job["state"] == "completed" and job["returnvalue"]["echo"] == "drain me"
    assert job["attemptsMade"] == 1
    # Nothing new was taken after SIGTERM: the delayed job is still there, untouched.
    later = await node.get_job(queue_name, waiting["id"])
    assert later["state"] in ("delayed", "waiting") and later["attemptsMade"] == 0
    assert "WORKER STATISTICS" in proc.output
    assert "Succeeded: 1" in proc.output


async def test_signals_after_the_drain_completed_still_exit_0(
    redis_url: str, queue_name: str
) -> None:
    # An idle worker drains at once; a second SIGTERM (a platform, or an impatient operator)
    # that lands while the process winds down must not turn exit 0 into death by SIGTERM.
    proc = await WorkerProcess.start(worker_env(redis_url, queue_name))
    try:
        await proc.wait_for_line("waiting for jobs")
        proc.proc.send_signal(signal.SIGTERM)
        await proc.wait_for_line("Jobs/minute")  # the statistics block: the drain completed
        while proc.proc.returncode is None:  # keep signalling until it is gone
            # os.kill, not send_signal: Popen.send_signal polls, which would reap the child
            # under asyncio's watcher (returncode 255).
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.proc.pid, signal.SIGTERM)
            await asyncio.sleep(0.001)
        assert await proc.wait(timeout=20) == 0, proc.output
    finally:
        await proc.kill()


async def test_kill_9_mid_job_then_restart_completes_the_job_once(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    env = worker_env(
        redis_url, queue_name, WORKER_LOCK_DURATION_MS=2000, WORKER_STALLED_INTERVAL_MS=2000
    )
    first = await WorkerProcess.start(env)
    await first.wait_for_line("waiting for jobs")
    added = await node.add(queue_name, "ping", {"sleepMs": 1500})
    await until_active(node, queue_name, added["id"])
    await first.kill()  # SIGKILL: no shutdown, the lock simply expires
    assert f"Job completed: {added['id']}" not in first.output
    killed_at = time.monotonic()
    second = await WorkerProcess.start(env)
    try:
        job = await node.wait_finished(queue_name, added["id"], timeout_ms=30000)
        recovered_s = time.monotonic() - killed_at
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait(timeout=20) == 0
    finally:
        await second.kill()
    assert job["state"] == "completed", job
    assert job["stalledCounter"] == 1  # recovered by the stalled-job check, not a retry
    assert job["attemptsMade"] == 1
    assert second.output.count(f"Job completed: {added['id']}") == 1
    assert recovered_s < 20


async def test_logs_are_json_lines_with_the_job_id_and_no_secret(
    node6: NodeBridge, queue_name: str
) -> None:
    password = "s3cret-Redis-pass"
    api_key = "sk-test-abcdefghijklmnopqrstuvwxyz0123"
    with private_redis(password=password) as url:
        env = worker_env(
            url, queue_name, LOG_FORMAT="json", OPENAI_API_KEY=api_key,
            SUPABASE_SERVICE_ROLE_KEY="service-role-secret-xyz",
        )  # fmt: skip
        node = await NodeBridge.start("6", url)
        proc = await WorkerProcess.start(env)
        try:
            await proc.wait_for_line("waiting for jobs")
            added = await node.add(queue_name, "ping", {"echo": "hi"})
            await node.wait_finished(queue_name, added["id"], timeout_ms=15000)
            proc.proc.send_signal(signal.SIGTERM)
            assert await proc.wait(timeout=20) == 0
            check = await WorkerProcess.start(env, "check")
            assert await check.wait(timeout=30) == 0, check.output
        finally:
            await proc.kill()
            await node.aclose()
    everything = proc.output + check.output
    for secret in (password, api_key, "service-role-secret-xyz"):
        assert secret not in everything
    assert ":***@" in everything  # the Redis URL is shown, its password masked
    records = [json.loads(line) for line in proc.lines if line.strip()]
    messages = [r["message"] for r in records]
    assert "WORKER SERVICE STARTED" in messages
    job_lines = [r for r in records if r.get("job_id") == added["id"]]
    assert any(r["message"].startswith("Job picked up") for r in job_lines)
    assert any(r["message"].startswith("Job completed") for r in job_lines)


async def test_text_logs_carry_the_banner_and_the_job_id(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    proc = await WorkerProcess.start(worker_env(redis_url, queue_name, NODE_ENV="production"))
    try:
        await proc.wait_for_line("waiting for jobs")
        added = await node6.add(queue_name, "ping", {})
        await node6.wait_finished(queue_name, added["id"], timeout_ms=15000)
        await proc.wait_for_line("Job completed")
        proc.proc.send_signal(signal.SIGINT)
        assert await proc.wait(timeout=20) == 0
    finally:
        await proc.kill()
    out = proc.output
    for expected in (
        "WORKER SERVICE STARTED", f"Queue: {queue_name}", "Concurrency: 3 jobs in parallel",
        "Environment: production", "Health check server listening on port",
        "Worker initialization complete, waiting for jobs...", "WORKER STATISTICS",
    ):  # fmt: skip
        assert expected in out
    assert f"[{added['id']}] Job picked up: {added['id']} (ping)" in out
    assert "Attempt: 1/3" in out


async def test_a_misspelt_variable_is_warned_about_at_start_up(
    redis_url: str, queue_name: str
) -> None:
    env = worker_env(redis_url, queue_name, WORKER_CONCURENCY=50, WORKER_HEALTHPORT=1)
    proc = await WorkerProcess.start(env)
    try:
        await proc.wait_for_line("waiting for jobs")
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait(timeout=20) == 0
    finally:
        await proc.kill()
    expected = (
        "WORKER_CONCURENCY is not a setting of this worker and is ignored;"
        " did you mean WORKER_CONCURRENCY?"
    )
    assert expected in proc.output
    assert "did you mean WORKER_HEALTH_PORT?" in proc.output


async def test_malformed_setting_stops_start_up_naming_the_variable(queue_name: str) -> None:
    proc = await WorkerProcess.start({"WORKER_CONCURRENCY": "lots", "WORKER_QUEUE": queue_name})
    assert await proc.wait(timeout=20) == 2
    assert "WORKER_CONCURRENCY" in proc.output


async def test_unreachable_redis_at_start_up_exits_non_zero_and_says_why(queue_name: str) -> None:
    from tests.support.redis_server import free_port

    env = worker_env(f"redis://127.0.0.1:{free_port()}", queue_name, WORKER_STARTUP_TIMEOUT_S=2)
    proc = await WorkerProcess.start(env)
    began = time.monotonic()
    code = await proc.wait(timeout=30)
    assert code == 1, proc.output
    assert time.monotonic() - began < 15
    assert "Redis not usable at start-up" in proc.output


async def test_a_wrong_password_stops_start_up_at_once_naming_it(queue_name: str) -> None:
    with private_redis(password="right-pass-123") as url:
        wrong = url.replace("right-pass-123", "wrong-pass-456")
        proc = await WorkerProcess.start(worker_env(wrong, queue_name, WORKER_STARTUP_TIMEOUT_S=30))
        began = time.monotonic()
        code = await proc.wait(timeout=40)
    assert code == 1, proc.output
    assert time.monotonic() - began < 5  # not after the 30 s start-up timeout
    assert "Cannot start: Redis not usable at start-up: authentication failed" in proc.output
    assert "REDIS_URL" in proc.output and "wrong-pass-456" not in proc.output


async def test_a_refused_connection_is_named_at_once_and_when_giving_up(queue_name: str) -> None:
    from tests.support.redis_server import free_port

    port = free_port()
    env = worker_env(f"redis://127.0.0.1:{port}", queue_name, WORKER_STARTUP_TIMEOUT_S=4)
    proc = await WorkerProcess.start(env)
    await proc.wait_for_line("Health check server listening")
    began = time.monotonic()
    await proc.wait_for_line(f"Redis not reachable yet: connection refused by 127.0.0.1:{port}")
    assert time.monotonic() - began < 1.5
    assert await proc.wait(timeout=20) == 1
    assert (
        f"Cannot start: Redis not usable at start-up: connection refused by 127.0.0.1:{port}"
        in (proc.output)
    )


@pytest.mark.parametrize("variable", ["WORKER_HEALTH_PORT", "PORT"])
async def test_a_taken_health_port_is_a_configuration_error_naming_it(
    variable: str, redis_url: str, queue_name: str
) -> None:
    env = worker_env(redis_url, queue_name)
    del env["WORKER_HEALTH_PORT"]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env[variable] = str(taken.getsockname()[1])
        proc = await WorkerProcess.start(env)
        code = await proc.wait(timeout=30)
    assert code == 2, proc.output
    assert f"Configuration error: {variable}: health port {env[variable]} cannot be bound" in (
        proc.output
    )
    assert "Traceback" not in proc.output


async def test_sigterm_while_connecting_exits_0_at_once(queue_name: str) -> None:
    from tests.support.redis_server import free_port

    env = worker_env(f"redis://127.0.0.1:{free_port()}", queue_name, WORKER_STARTUP_TIMEOUT_S=60)
    proc = await WorkerProcess.start(env)
    await proc.wait_for_line("Health check server listening")
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.wait(timeout=15) == 0, proc.output


async def test_a_restarted_replica_takes_back_its_crashed_runs_jobs_at_once(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    # Three live replicas, each with the identity Railway gives it; one is killed mid-job and
    # restarted. Its jobs run again within seconds of the restart (not lock 30 s + stalled
    # check 30 s later), and no job of the two live replicas is taken from them.
    def env(replica: str) -> dict[str, str]:
        return worker_env(redis_url, queue_name, RAILWAY_REPLICA_ID=replica,
                          WORKER_CONCURRENCY=2, WORKER_LIMITER_MAX=0)  # fmt: skip

    procs = {name: await WorkerProcess.start(env(name)) for name in ("a", "b", "c")}
    restarted: WorkerProcess | None = None
    try:
        for proc in procs.values():
            await proc.wait_for_line("waiting for jobs")
        added = await node6.add_bulk(
            queue_name, [{"name": "ping", "data": {"sleepMs": 2500}} for _ in range(6)]
        )
        for job_id in added["ids"]:
            await until_active(node6, queue_name, job_id)

        async def held_by_c() -> list[str]:  # its 2 slots are full: both lines come (log sink)
            held = [i for i in added["ids"] if f"Job picked up: {i}" in procs["c"].output]
            return held if len(held) == 2 else []

        held = await eventually(held_by_c, timeout=10)
        await procs["c"].kill()
        restarted_at = time.monotonic()
        restarted = await WorkerProcess.start(env("c"))
        for job_id in held:
            await node6.wait_finished(queue_name, job_id, timeout_ms=20_000)
        recovered_s = time.monotonic() - restarted_at
        jobs = [await node6.wait_finished(queue_name, i, timeout_ms=20_000) for i in added["ids"]]
        await restarted.wait_for_line("Took back")
    finally:
        for proc in [*procs.values(), *([restarted] if restarted else [])]:
            await proc.kill()
    assert recovered_s < 5 + 2.5 + 3, recovered_s  # take back within 5 s, run 2.5 s, slack
    everyone = "\n".join(p.output for p in [*procs.values(), restarted])
    for job in jobs:
        assert job["state"] == "completed" and job["attemptsMade"] == 1, job
        assert job["stalledCounter"] == 0  # taken back, not recovered as a stall
        assert everyone.count(f"Job completed: {job['id']}") == 1
