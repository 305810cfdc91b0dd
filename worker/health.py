"""The HTTP face of the worker: /health (INTEROP §6 JSON), /ready, /metrics."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from loguru import logger

from worker.metrics import CONTENT_TYPE, Metrics, QueueSnapshot
from worker.results import node_json
from worker.stats import Stats

REDIS_PING_TIMEOUT_S = 2.0
# Where the host has no usable IPv6 (kernel without it, or IPv6 turned off): bind IPv4 instead.
NO_IPV6 = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})


@dataclass
class QueueProbe:
    """What /ready needs from Redis; filled by `probe()`."""

    waiting: int
    paused: bool
    rate_limited_ms: int = 0  # PTTL of the queue's limiter key: > 0 while queue.rateLimit() lasts
    # What the worker's own Redis calls meet now (worker/backoff.py): reads may answer while
    # writes fail (a read-only replica after a failover).
    redis_problem: str | None = None


@dataclass
class QueueView:
    """One consumed queue as /ready and /metrics see it: its own counters and slots, and how
    to read its state in Redis."""

    name: str
    stats: Stats
    concurrency: int
    probe: Callable[[], Awaitable[QueueProbe]]
    snapshot: Callable[[], Awaitable[QueueSnapshot]]


def iso_now() -> str:
    """`new Date().toISOString()`: UTC, milliseconds, `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def express_json(body: Any, status: int = 200) -> web.Response:
    """What Express's `res.json` sends: `JSON.stringify` (no spaces: the web service's
    test-worker-service.sh greps `"status":"healthy"`), `application/json; charset=utf-8`."""
    return web.Response(
        text=node_json(body), status=status, content_type="application/json", charset="utf-8"
    )


def listening_socket(port: int) -> socket.socket:
    """All addresses, IPv6 and IPv4: `::` with IPv4 mapped, else `0.0.0.0` where IPv6 is absent.

    Railway's private network is IPv6-only in environments created before 2025-10-16, so a
    monitor reaching `<worker>.railway.internal` needs an IPv6 listener, while the deploy-time
    health check may come over IPv4. asyncio's `create_server(host="::")` sets IPV6_V6ONLY,
    hence the socket is made here, with it cleared.
    """
    try:
        sock = _bound(socket.AF_INET6, ("::", port), v6only=False)
    except OSError as exc:
        if exc.errno not in NO_IPV6:
            raise  # e.g. the port is taken: the same error an IPv4 bind would give
        logger.debug("No IPv6 here ({}); health server on IPv4 only", exc)
        sock = _bound(socket.AF_INET, ("0.0.0.0", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _bound(family: int, address: tuple[str, int], v6only: bool | None = None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class HealthServer:
    def __init__(
        self,
        stats: Stats,
        port: int,
        queues: Sequence[QueueView],
        ready_stall_s: float,
        host: str | None = None,  # None: every address, IPv6 and IPv4 (`listening_socket`)
        metrics: Metrics | None = None,
    ) -> None:
        """`stats`: the totals over every queue consumed; `queues`: each one's own view."""
        self.stats = stats
        self.prometheus = metrics or Metrics("", lambda: stats.currently_processing)
        self.port = port
        self.host = host
        self.queues = list(queues)
        self.ready_stall_s = ready_stall_s
        self.draining = False
        self._runner: web.AppRunner | None = None
        app = web.Application()
        for path in ("/health", "/api/health", "/"):
            app.router.add_get(path, self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        self.app = app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if self.host is None:
            site = web.SockSite(self._runner, listening_socket(self.port))
        else:
            site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])  # port 0 in tests: the one picked
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def health_body(self) -> dict[str, Any]:
        """INTEROP §6's keys, in its order; `stats` over every queue. Several queues add
        `queues` (each one's stats, by name) after them: scripts grep the seed's bytes."""
        uptime = self.stats.uptime_ms
        body: dict[str, Any] = {
            "status": "healthy",
            "service": "worker",
            "uptime": uptime,
            "uptimeMinutes": f"{uptime / 60000:.2f}",
            "stats": self.stats.as_health(),
            "timestamp": iso_now(),
            "pid": os.getpid(),
        }
        if len(self.queues) > 1:
            body["queues"] = {view.name: view.stats.as_health() for view in self.queues}
        return body

    async def health(self, request: web.Request) -> web.Response:
        return express_json(self.health_body())

    async def readiness(self) -> tuple[bool, str]:
        """Ready when every queue is; the reason names the queue when there are several."""
        if self.draining:
            return False, "draining: shutting down, not taking jobs"
        try:
            probes = await asyncio.wait_for(
                asyncio.gather(*(view.probe() for view in self.queues)),
                timeout=REDIS_PING_TIMEOUT_S,
            )
        except Exception as exc:
            return False, f"redis unreachable: {type(exc).__name__}"
        answers = [
            (view, *self._queue_readiness(view, probe))
            for view, probe in zip(self.queues, probes, strict=True)
        ]
        if len(answers) == 1:
            return answers[0][1], answers[0][2]
        not_ready = [(view, reason) for view, ok, reason in answers if not ok]
        shown = not_ready or [(view, reason) for view, _, reason in answers if reason != "ok"]
        if not shown:
            return True, "ok"
        return not not_ready, "; ".join(f"{view.name}: {reason}" for view, reason in shown)

    def _queue_readiness(self, view: QueueView, probe: QueueProbe) -> tuple[bool, str]:
        if probe.redis_problem:
            return False, f"redis: {probe.redis_problem}"
        if probe.paused:
            return True, "queue paused by an operator"
        if probe.rate_limited_ms > 1000:
            # Paused by queue.rateLimit (a Node worker meeting a 429): not a stopped worker.
            return True, f"queue rate-limited for {probe.rate_limited_ms / 1000:.0f} s more"
        stats = view.stats
        last = stats.last_pickup_monotonic or stats.started_monotonic
        idle_s = time.monotonic() - last
        has_free_slot = stats.currently_processing < view.concurrency
        if probe.waiting > 0 and has_free_slot and idle_s > self.ready_stall_s:
            return False, (
                f"stuck: {probe.waiting} jobs waiting, none taken for {idle_s:.0f} s"
                f" (limit {self.ready_stall_s:.0f} s)"
            )
        return True, "ok"

    async def ready(self, request: web.Request) -> web.Response:
        ok, reason = await self.readiness()
        if not ok:
            logger.warning("/ready: {}", reason)
        return express_json(
            {"ready": ok, "reason": reason, "timestamp": iso_now()}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format 0.0.4, by prometheus_client (worker/metrics.py)."""
        snapshots = {view.name: view.snapshot for view in self.queues}
        body = await self.prometheus.render(snapshots, REDIS_PING_TIMEOUT_S)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def no_snapshot() -> QueueSnapshot:
    """A view that cannot read its queue (tests): /metrics shows `worker_redis_up 0`."""
    raise RuntimeError("no queue to read")
