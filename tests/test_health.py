"""/health answers INTEROP §6's JSON; /ready tells a live worker from one that stopped consuming."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.redis_server import private_redis
from worker import health
from worker.context import JobContext
from worker.health import HealthServer, QueueProbe, QueueView, no_snapshot
from worker.registry import ProcessorSpec
from worker.service import Service
from worker.stats import Stats


async def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}{path}") as response:
            return response.status, await response.json()


async def test_health_json_is_exactly_the_seeds(redis_url: str, queue_name: str) -> None:
    async with running_service(settings_for(redis_url, queue_name)) as service:
        port = service.health.port
        answers = [await get(port, path) for path in ("/health", "/api/health", "/")]
    for status, body in answers:
        assert status == 200
        assert list(body) == [
            "status", "service", "uptime", "uptimeMinutes", "stats", "timestamp", "pid",
        ]  # fmt: skip
        assert body["status"] == "healthy" and body["service"] == "worker"
        assert isinstance(body["uptime"], int) and isinstance(body["pid"], int)
        assert re.fullmatch(r"\d+\.\d\d", body["uptimeMinutes"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["timestamp"])
        assert list(body["stats"]) == [
            "processed", "succeeded", "failed", "currentlyProcessing", "peakConcurrency",
            "successRate",
        ]  # fmt: skip
        assert body["stats"]["successRate"] == "0.0%"


async def test_ready_is_503_while_draining(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async def slow(payload: dict[str, Any], ctx: JobContext) -> None:
        await asyncio.sleep(1.5)

    settings = settings_for(redis_url, queue_name)
    service = Service(settings, registry_of(ProcessorSpec("slow", slow)), _contract())
    await service.start()
    port = service.health.port
    assert (await get(port, "/ready"))[0] == 200
    added = await node6.add(queue_name, "slow", {})
    await eventually(lambda: _state_is(node6, queue_name, added["id"], "active"))
    stopping = asyncio.create_task(service.stop())
    _, body = await eventually(lambda: _status_if(port, "/ready", 503), timeout=5)
    assert "draining" in body["reason"]
    await stopping


async def test_ready_is_503_while_redis_is_unreachable(queue_name: str) -> None:
    with private_redis() as url:
        service = Service(settings_for(url, queue_name), registry_of(), _contract())
        await service.start()
        assert (await get(service.health.port, "/ready"))[0] == 200
    try:
        status, body = await get(service.health.port, "/ready")
        assert status == 503 and "redis unreachable" in body["reason"]
        # /health stays 200: the process is alive; /ready is what says it cannot work.
        assert (await get(service.health.port, "/health"))[0] == 200
    finally:
        # Shutdown stays bounded with Redis gone (a stuck fetch must not hold it).
        await asyncio.wait_for(service.stop(), timeout=15)


async def test_ready_is_503_when_jobs_wait_and_none_is_taken(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_READY_STALL_S=1)
    async with running_service(settings) as service:
        port = service.health.port
        assert (await get(port, "/ready"))[0] == 200
        # Wedge the consumer the way a lost-lock bug would: it stops fetching, stays alive.
        service.worker.pause()
        await node6.add(queue_name, "ping", {})
        _, body = await eventually(lambda: _status_if(port, "/ready", 503), timeout=10)
        assert "stuck" in body["reason"]
        service.worker.resume()
        await eventually(lambda: _status_if(port, "/ready", 200), timeout=10)


async def test_metrics_exposes_the_counters(redis_url: str, queue_name: str) -> None:
    async with running_service(settings_for(redis_url, queue_name)) as service:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{service.health.port}/metrics"
            async with session.get(url) as response:
                text = await response.text()
    # Read as Prometheus reads it (tests/test_observability.py checks every metric).
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (in_flight,) = families["worker_jobs_in_flight"].samples
    assert in_flight.value == 0 and in_flight.labels == {"queue": queue_name}
    assert families["worker_draining"].samples[0].value == 0


async def _status_if(port: int, path: str, want: int) -> tuple[int, Any] | None:
    status, body = await get(port, path)
    return (status, body) if status == want else None


async def _state_is(node: NodeBridge, queue: str, job_id: str, state: str) -> bool:
    job = await node.get_job(queue, job_id)
    return bool(job and job["state"] == state)


def _contract() -> Any:
    from worker.contract import Contract

    return Contract.load()


async def test_ready_stays_200_while_the_queue_waits_out_a_rate_limit(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_READY_STALL_S=1)
    async with running_service(settings) as service:
        await service.worker.protocol.rate_limit(8000)  # Node's queue.rateLimit on a 429
        await node6.add(queue_name, "ping", {})
        await asyncio.sleep(1.5)
        status, body = await get(service.health.port, "/ready")
        assert status == 200 and "rate-limited" in body["reason"], body
        await service.worker.protocol.redis.delete(service.worker.protocol.keys["limiter"])


# --- where the health server listens -----------------------------------------------------


async def _idle_probe() -> QueueProbe:
    return QueueProbe(waiting=0, paused=False)


def _bare_server(port: int = 0) -> HealthServer:
    """The server as Service builds it: no host given."""
    stats = Stats()
    view = QueueView("ai-jobs", stats, 3, _idle_probe, no_snapshot)
    return HealthServer(stats, port, [view], ready_stall_s=120.0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_health_answers_over_ipv6_and_ipv4_on_one_port() -> None:
    """Railway's legacy private network is IPv6-only: `::` with IPv4 mapped serves both."""
    if not _has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback to connect from")
    server = _bare_server()
    port = await server.start()
    try:
        for host in ("[::1]", "127.0.0.1"):
            status, body = await get(port, "/health", host)
            assert status == 200 and body["status"] == "healthy", (host, body)
        assert (await get(port, "/ready", "[::1]"))[0] == 200
    finally:
        await server.stop()


async def test_health_falls_back_to_ipv4_where_ipv6_is_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_bound = health._bound

    def no_ipv6(family: int, address: tuple[str, int], v6only: bool | None = None) -> Any:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_bound(family, address, v6only)

    monkeypatch.setattr(health, "_bound", no_ipv6)
    server = _bare_server()
    port = await server.start()
    try:
        assert (await get(port, "/health"))[0] == 200
        if _has_ipv6_loopback():  # it really is the IPv4 socket that answers
            with pytest.raises(aiohttp.ClientConnectionError):
                await get(port, "/health", "[::1]")
    finally:
        await server.stop()


async def test_a_taken_port_is_an_error_not_a_silent_ipv4_fallback() -> None:
    with socket.socket(socket.AF_INET) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        server = _bare_server(taken.getsockname()[1])
        with pytest.raises(OSError) as caught:
            await server.start()
        await server.stop()
    assert caught.value.errno == errno.EADDRINUSE


# What the web service's own test-worker-service.sh checks (INTEROP §9), with its tools: curl
# for the body, grep for the exact bytes (compact JSON, as Express's res.json writes it).
WEB_SERVICE_CHECK = r"""
set -u
body=$(curl -s "$WORKER_URL/health")
echo "$body" | grep -q '"status":"healthy"' || { echo "test 1: not healthy"; exit 1; }
processed=$(echo "$body" | grep -o '"processed":[0-9]*' | cut -d: -f2)
succeeded=$(echo "$body" | grep -o '"succeeded":[0-9]*' | cut -d: -f2)
[ -n "$processed" ] && [ -n "$succeeded" ] || { echo "no processed/succeeded counts"; exit 1; }
echo "$processed $succeeded"
"""


async def test_the_web_services_own_health_check_passes(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)) as service:
        port = service.health.port
        added = await node6.add(queue_name, "ping", {})
        await node6.wait_finished(queue_name, added["id"])
        check = await asyncio.create_subprocess_exec(
            "bash", "-c", WEB_SERVICE_CHECK,
            env={"WORKER_URL": f"http://127.0.0.1:{port}", "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await check.communicate()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                content_type = response.headers["Content-Type"]
                raw = await response.read()
    assert check.returncode == 0, out
    assert out.split() == [b"1", b"1"]
    assert content_type == "application/json; charset=utf-8"  # as Express sends it
    body = json.loads(raw)
    assert raw.decode() == json.dumps(body, separators=(",", ":"))  # JSON.stringify: no spaces
