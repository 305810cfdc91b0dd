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
from worker.health import HealthServer, QueueProbe, QueueView
from worker.logs import Redactor, flush_logs, secrets_from_env
from worker.loop import JobLoop, RedisUnavailable
from worker.metrics import Metrics, QueueMetrics, QueueSnapshot
from worker.protocol import QueueProtocol
from worker.registry import Registry
from worker.settings import QueueSettings, Settings
from worker.stats import QueueStats, Stats

LOOP_LAG_WARN_S = 1.0


class Service:
    """Every queue the settings name (WORKER_QUEUES), each consumed by a JobLoop of its own (its
    slots, limiter and blocking connection), around one registry, one health server, one
    signal handler and one shutdown; /health and the statistics count every queue together."""

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
        self.stats = Stats()  # every queue's jobs: /health, the WORKER STATISTICS block
        self.metrics = Metrics(
            settings.queue,
            lambda: self.worker.stats.currently_processing if self.worker is not None else 0,
            settings.ai_prices,
            draining=lambda: float(self.health is not None and self.health.draining),
            provider_prices=settings.provider_prices,
        )
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.workers: dict[str, JobLoop] = {}  # every queue's, by name
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

    @property
    def worker(self) -> JobLoop | None:
        """The first queue's run loop (the only one, unless WORKER_QUEUES names several)."""
        return next(iter(self.workers.values()), None)

    def _build(self) -> None:
        s = self.settings
        worker_id = uuid.uuid4().hex  # one per process: lock tokens and heartbeats are per queue
        identity = self.identity(worker_id)
        first: QueueProtocol | None = None
        for queue in s.consumed:
            protocol = QueueProtocol(s.for_queue(queue), s.worker_name, share=first)
            first = first or protocol
            self.workers[queue.name] = self._loop(queue, protocol, identity, worker_id)

    def _loop(
        self,
        queue: QueueSettings,
        protocol: QueueProtocol,
        identity: dict[str, Any],
        worker_id: str,
    ) -> JobLoop:
        """One queue's loop. Alone, it counts in the service's own Stats and Metrics (nothing
        more per job than before); beside others, in its own, which add up into them."""
        s = self.settings
        stats: Stats = self.stats
        metrics: QueueMetrics = self.metrics
        if len(s.consumed) > 1:
            stats = QueueStats(self.stats)
            metrics = self.metrics.for_queue(queue.name, lambda: stats.currently_processing)
        dispatcher = Dispatcher(
            self.registry,
            self.contract,
            identity,
            protocol.redis,
            state_key_for(s.prefix, queue.name),
            protocol.update_progress,
            s.job_timeout_s,
            self.redact,
            metrics.ai_usage,
            metrics.provider_usage,
        )
        return JobLoop(
            s.for_queue(queue), protocol, dispatcher, stats, worker_id, s.instance_id, metrics
        )

    async def run_until_idle(self) -> None:
        """Process what the queues hold, then return (no health server, no signals)."""
        self._build()
        await asyncio.gather(
            *(w.run_until_idle(self.settings.startup_timeout_s) for w in self.workers.values())
        )

    async def start(self) -> None:
        """Health server up, banner out, worker consuming."""
        s = self.settings
        self._build()
        views = [self._view(name, worker) for name, worker in self.workers.items()]
        health = HealthServer(
            self.stats, s.health_port, views, s.ready_stall_s, metrics=self.metrics
        )
        self.health = health

        logger.info("=" * 60)
        logger.info("WORKER SERVICE STARTED")
        if len(s.consumed) == 1:
            logger.info("Queue: {}", s.queue)
            logger.info("Concurrency: {} jobs in parallel", s.concurrency)
        else:
            for queue in s.consumed:
                logger.info(
                    "Queue: {} | concurrency {} | limiter {}", queue.name, queue.concurrency,
                    s.for_queue(queue).limiter_text,
                )  # fmt: skip
            logger.info("Concurrency: {} jobs in parallel", sum(q.concurrency for q in s.consumed))
        logger.info("Environment: {}", s.environment)
        logger.info(
            "Redis: {} (from {}) | prefix {}{}",
            s.redis.redacted_url,
            s.redis.source,
            s.prefix,
            f" | limiter {s.limiter_text}" if len(s.consumed) == 1 else "",
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
        starts = [
            asyncio.ensure_future(w.start(s.startup_timeout_s)) for w in self.workers.values()
        ]
        try:
            await asyncio.gather(*starts)
        except BaseException:  # one queue cannot start: the others stop trying (then stop())
            for task in starts:
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            raise
        logger.info("Worker initialization complete, waiting for jobs...")
        self._own(self._watch_loop_lag(), "loop-lag")
        for name, worker in self.workers.items():
            self._own(self._watch_slots(worker), f"slot-watch-{name}")

    async def stop(self) -> None:
        """Graceful shutdown within the grace period, then the statistics block. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        try:
            if self.workers and self.health is not None:
                await self._shutdown(list(self.workers.values()), self.health)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.health is not None:
                await self.health.stop()
            await self.registry.aclose()
            self._print_statistics()
            flush_logs()  # the statistics block is written before the process can exit

    async def _shutdown(self, workers: list[JobLoop], health: HealthServer) -> None:
        """Every queue stops taking jobs at once; one grace period for all of them, then what
        still runs on any queue goes back to its queue."""
        grace = self.settings.shutdown_grace_s
        health.draining = True
        logger.info(
            "Stopped taking jobs; waiting up to {:.0f} s for {} in-flight job(s)",
            grace,
            sum(len(worker.in_flight()) for worker in workers),
        )
        handed_back = await asyncio.gather(*(w.stop(grace, self._hard_stop) for w in workers))
        for worker, moved in zip(workers, handed_back, strict=True):
            if moved:
                logger.warning(
                    "{}: {} job(s) back in the queue{}, no attempt used: {}",
                    "Shutdown deadline" if worker.deadline_hit else "Drained",
                    len(moved),
                    f" {worker.protocol.queue}" if len(workers) > 1 else "",
                    ", ".join(moved),
                )
        logger.info("Worker closed")

    def _view(self, name: str, worker: JobLoop) -> QueueView:
        """One queue as /ready and /metrics read it."""

        async def probe() -> QueueProbe:
            waiting, paused, limited_ms = await worker.protocol.probe()
            return QueueProbe(waiting, paused, limited_ms, worker.backoff.problem)

        async def snapshot() -> QueueSnapshot:
            counts, paused, limited_ms = await worker.protocol.snapshot()
            return QueueSnapshot(counts, paused, limited_ms)

        return QueueView(name, worker.stats, worker.settings.concurrency, probe, snapshot)

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
        if len(self.workers) > 1:
            for name, worker in self.workers.items():
                q = worker.stats
                logger.info(
                    "Queue {}: processed {} | succeeded {} | failed {} | peak concurrency {}",
                    name, q.processed, q.succeeded, q.failed, q.peak_concurrency,
                )  # fmt: skip
        logger.info("=" * 60)
