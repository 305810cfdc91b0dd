"""The running service: worker + health server + signals + a shutdown with a deadline."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from loguru import logger

from worker import __version__
from worker.contract import Contract
from worker.dispatch import Dispatcher, state_key_for
from worker.errors import ConfigError
from worker.health import HealthServer, QueueProbe
from worker.logs import Redactor, flush_logs, secrets_from_env
from worker.loop import JobLoop, RedisUnavailable
from worker.metrics import Metrics, QueueSnapshot
from worker.protocol import QueueProtocol
from worker.registry import Registry
from worker.settings import Settings
from worker.stats import Stats

LOOP_LAG_WARN_S = 1.0


class Service:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        contract: Contract,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        # Masks secrets in job logs; by default the one `setup_logging` builds from the same env.
        self.redact = redact or Redactor(secrets_from_env(os.environ, [settings.redis.password]))
        self.registry = registry
        self.contract = contract
        self.stats = Stats()
        self.metrics = Metrics(
            settings.queue,
            lambda: self.stats.currently_processing,
            settings.ai_prices,
            draining=lambda: float(self.health is not None and self.health.draining),
            provider_prices=settings.provider_prices,
        )
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.worker: JobLoop | None = None
        self.health: HealthServer | None = None
        self._stopped = False
        self.exit_code = 0  # non-zero when the service stops because something broke

    def identity(self, worker_id: str) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workerId": worker_id,
            "version": __version__,
        }

    def request_stop(self, signame: str = "stop") -> None:
        if self._stop.is_set():
            logger.warning("Second {}: in-flight jobs go back to the queue now", signame)
            self._hard_stop.set()
            return
        logger.info("Received {}, shutting down gracefully", signame)
        self._stop.set()

    async def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT, shut down gracefully; returns the exit code."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            starting = asyncio.create_task(self.start())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # SIGTERM while still connecting: just leave
                starting.cancel()
            try:
                await starting
            except asyncio.CancelledError:
                pass
            except RedisUnavailable as exc:
                logger.error("Cannot start: {}", exc)
                self.exit_code = 1
                self._stop.set()
            except ConfigError as exc:
                logger.error("Configuration error: {}", exc)
                self.exit_code = 2
                self._stop.set()
            await self._stop.wait()
            stop.cancel()
        finally:
            await self.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)  # which restores SIG_DFL: death by signal
                # Stopped and drained: a late signal while the process winds down must not turn
                # the exit code into -15 (SIGKILL still ends it).
                signal.signal(sig, signal.SIG_IGN)
        return self.exit_code

    def _build(self) -> JobLoop:
        s = self.settings
        worker_id = uuid.uuid4().hex
        protocol = QueueProtocol(s, s.worker_name)
        dispatcher = Dispatcher(
            self.registry,
            self.contract,
            self.identity(worker_id),
            protocol.redis,
            state_key_for(s.prefix, s.queue),
            protocol.update_progress,
            s.job_timeout_s,
            self.redact,
            self.metrics.ai_usage,
            self.metrics.provider_usage,
        )
        self.worker = JobLoop(
            s, protocol, dispatcher, self.stats, worker_id, s.instance_id, self.metrics
        )
        return self.worker

    async def run_until_idle(self) -> None:
        """Process what the queue holds, then return (no health server, no signals)."""
        await self._build().run_until_idle(self.settings.startup_timeout_s)

    async def start(self) -> None:
        """Health server up, banner out, worker consuming."""
        s = self.settings
        worker = self._build()
        health = HealthServer(
            self.stats, s.health_port, self._probe, s.concurrency, s.ready_stall_s,
            metrics=self.metrics, snapshot=self._snapshot,
        )  # fmt: skip
        self.health = health

        logger.info("=" * 60)
        logger.info("WORKER SERVICE STARTED")
        logger.info("Queue: {}", s.queue)
        logger.info("Concurrency: {} jobs in parallel", s.concurrency)
        logger.info("Environment: {}", s.environment)
        logger.info(
            "Redis: {} (from {}) | prefix {} | limiter {}",
            s.redis.redacted_url,
            s.redis.source,
            s.prefix,
            f"{s.limiter_max} jobs per {s.limiter_duration_ms} ms" if s.limiter else "off",
        )
        if s.redis.tls_insecure:
            logger.warning(
                "Redis TLS certificate NOT verified (REDIS_TLS_INSECURE=true): anyone on the "
                "path can read and change the jobs; for self-signed test setups only"
            )
        elif s.redis.tls:
            logger.info("Redis connection: {}", s.redis.tls_mode)
        logger.info("Job types: {}", ", ".join(self.registry.names()))
        for sentence in self.registry.disabled.values():
            logger.warning("Job type {}", sentence)
        for spec in self.registry:
            for note in spec.notes:
                logger.warning("{}: {}", spec.name, note)
        try:
            port = await health.start()
        except OSError as exc:
            raise s.health_port_error(exc) from exc
        logger.info("Health check server listening on port {}", port)
        await worker.start(s.startup_timeout_s)
        logger.info("Worker initialization complete, waiting for jobs...")
        self._own(self._watch_loop_lag(), "loop-lag")
        self._own(self._watch_slots(worker), "slot-watch")

    async def stop(self) -> None:
        """Graceful shutdown within the grace period, then the statistics block. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        try:
            if self.worker is not None and self.health is not None:
                await self._shutdown(self.worker, self.health)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.health is not None:
                await self.health.stop()
            await self.registry.aclose()
            self._print_statistics()
            flush_logs()  # the statistics block is written before the process can exit

    async def _shutdown(self, worker: JobLoop, health: HealthServer) -> None:
        grace = self.settings.shutdown_grace_s
        health.draining = True
        logger.info(
            "Stopped taking jobs; waiting up to {:.0f} s for {} in-flight job(s)",
            grace,
            len(worker.in_flight()),
        )
        moved = await worker.stop(grace, self._hard_stop)
        if moved:
            logger.warning(
                "{}: {} job(s) back in the queue, no attempt used: {}",
                "Shutdown deadline" if worker.deadline_hit else "Drained",
                len(moved),
                ", ".join(moved),
            )
        logger.info("Worker closed")

    async def _probe(self) -> QueueProbe:
        assert self.worker is not None
        waiting, paused, limited_ms = await self.worker.protocol.probe()
        return QueueProbe(waiting, paused, limited_ms, self.worker.backoff.problem)

    async def _snapshot(self) -> QueueSnapshot:
        assert self.worker is not None
        counts, paused, limited_ms = await self.worker.protocol.snapshot()
        return QueueSnapshot(counts, paused, limited_ms)

    def _own(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error(
                "Background task {} failed", task.get_name()
            )

    async def _watch_slots(self, worker: JobLoop) -> None:
        """The slots must not end by themselves, nor Redis fail for WORKER_REDIS_GIVE_UP_S
        (worker/backoff.py); if either happens, stop with exit code 1: the platform restarts us."""
        while (worker.running and not worker.backoff.gave_up) or self._stop.is_set():
            if self._stop.is_set():
                return
            await asyncio.sleep(1.0)
        if worker.backoff.gave_up:
            logger.error("Stopping so the platform restarts the worker: {}", worker.backoff.gave_up)
        else:
            logger.error("The job slots ended unexpectedly; stopping so the service restarts")
        self.exit_code = 1  # non-zero, so a restart-on-failure policy brings us back
        self.request_stop("slots-exit")

    async def _watch_loop_lag(self) -> None:
        """Warn when something blocks the event loop: lock renewal stops while it does."""
        interval = 0.5
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - before - interval
            if lag > LOOP_LAG_WARN_S:
                logger.warning(
                    "Event loop was blocked for {:.1f} s: blocking code must run in a thread", lag
                )

    def _print_statistics(self) -> None:
        st = self.stats
        logger.info("=" * 60)
        logger.info("WORKER STATISTICS")
        logger.info("Uptime: {:.2f} minutes", st.uptime_ms / 60000)
        logger.info("Processed: {}", st.processed)
        logger.info("Succeeded: {}", st.succeeded)
        logger.info("Failed: {}", st.failed)
        logger.info("Success rate: {}", st.success_rate)
        logger.info("Retried attempts: {} | requeued: {}", st.retried, st.requeued)
        logger.info("Peak concurrency: {}", st.peak_concurrency)
        logger.info("Jobs/minute: {:.2f}", st.jobs_per_minute)
        logger.info("=" * 60)
