"""The one processor BullMQ calls: routes by name, validates, runs, records, classifies errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bullmq import Job
from bullmq.custom_errors import DelayedError, UnrecoverableError
from loguru import logger

from worker.context import JobContext
from worker.errors import PermanentJobError, RateLimited
from worker.keys import IDEMPOTENCY_TTL_S, job_state_key
from worker.results import node_json, to_json_safe

if TYPE_CHECKING:
    from worker.consumer import QueueWorker
    from worker.contract import Contract
    from worker.registry import Registry
    from worker.stats import Stats

# Bounds for an upstream Retry-After: never hammer, never park the queue for ages.
MIN_RATE_LIMIT_S = 1.0
MAX_RATE_LIMIT_S = 300.0


class Dispatcher:
    """Callable given to bullmq as the processor: `await dispatcher(job, token)`."""

    def __init__(
        self,
        registry: Registry,
        contract: Contract,
        stats: Stats,
        identity: Mapping[str, Any],
    ) -> None:
        self.registry = registry
        self.contract = contract
        self.stats = stats
        self.identity = dict(identity)
        self.worker: QueueWorker | None = None  # set by the service once the worker exists

    def attach(self, worker: QueueWorker) -> None:
        self.worker = worker
        worker.on("completed", self._on_completed)
        worker.on("failed", self._on_failed)
        worker.on("error", self._on_error)
        worker.on(
            "stalled",
            lambda job_id, *_: logger.warning("Job stalled and was moved back: {}", job_id),
        )

    async def __call__(self, job: Job, token: str) -> Any:
        assert self.worker is not None, "attach() the worker first"
        attempt = job.attemptsMade + 1
        max_attempts = int(job.opts.get("attempts") or 1)
        started = time.monotonic()
        self.stats.job_started()
        job._py_started = started
        with logger.contextualize(job_id=job.id, job_name=job.name, attempt=attempt):
            logger.info("Job picked up: {} ({})", job.id, job.name)
            logger.info("Currently processing: {} jobs", self.stats.currently_processing)
            logger.opt(lazy=True).info(  # lazy: no timestamp formatted below INFO
                "Processing job | Job ID: {} | Job Type: {} | Attempt: {}/{} | Started: {}",
                lambda: job.id,
                lambda: job.name,
                lambda: attempt,
                lambda: max_attempts,
                _iso_now,
            )
            try:
                return await self._run(job, token, attempt, max_attempts)
            except RateLimited as exc:
                await self._requeue_rate_limited(job, token, exc)
                self._end(job, "requeued")
                raise DelayedError(str(exc)) from exc  # bullmq: job already moved, do nothing
            except PermanentJobError as exc:
                logger.error("Job failed, not retried: {}", exc)
                raise UnrecoverableError(str(exc)) from exc
            except asyncio.CancelledError:
                logger.warning("Job interrupted by shutdown; it goes back to the queue")
                self._end(job, "requeued")
                raise
            except Exception as exc:
                logger.opt(exception=exc).error(
                    "Job attempt {}/{} failed: {}", attempt, max_attempts, _reason(exc)
                )
                if attempt >= max_attempts:
                    logger.error("Max retries reached for job {}", job.id)
                raise

    async def _run(self, job: Job, token: str, attempt: int, max_attempts: int) -> Any:
        assert self.worker is not None
        spec = self.registry.get(job.name)  # UnknownJobType: permanent
        data = job.data if job.data is not None else {}
        # Start-up refuses a processor without a schema; only tests register such processors.
        checked = self.contract.has(job.name)
        if checked:
            self.contract.validate_payload(job.name, data)  # InvalidPayload: permanent
        ctx = JobContext(
            job_id=str(job.id),
            name=job.name,
            attempt=attempt,
            max_attempts=max_attempts,
            progress=job.updateProgress,
            log=logger.bind(job_id=job.id, job_name=job.name, attempt=attempt),
            redis=self.worker.redisConnection.conn,
            state_key=job_state_key(self.worker.prefix, self.worker.name, str(job.id)),
            worker=self.identity,
        )
        result = to_json_safe(await spec.run(data, ctx))  # UnsafeResult: permanent
        if checked:
            self.contract.validate_result(job.name, result)  # ContractViolation: permanent
        await self._write_idempotency(job, result)
        return result

    async def _write_idempotency(self, job: Job, result: Any) -> None:
        """INTEROP §3: SETEX before the job is marked completed; a failure never fails the job."""
        key = job.opts.get("idempotencyKey")
        if not key:
            return
        assert self.worker is not None
        value = node_json({"jobId": job.id, "result": result, "cachedAt": int(time.time() * 1000)})
        try:
            await self.worker.redisConnection.conn.set(str(key), value, ex=IDEMPOTENCY_TTL_S)
        except Exception as exc:
            logger.warning("Could not write idempotency key {}: {}", key, exc)

    async def _requeue_rate_limited(self, job: Job, token: str, exc: RateLimited) -> None:
        assert self.worker is not None
        wait_s = min(max(exc.retry_after_s, MIN_RATE_LIMIT_S), MAX_RATE_LIMIT_S)
        await self.worker.rate_limit_queue(int(wait_s * 1000))
        code = await self.worker.move_to_wait(job, token)
        logger.warning(
            "Rate limited upstream: queue paused {:.1f} s, job {} back to waiting (code {})",
            wait_s,
            job.id,
            code,
        )

    def _end(self, job: Job, outcome: str) -> None:
        started = getattr(job, "_py_started", None)
        if started is None:
            return
        job._py_started = None
        self.stats.job_ended(outcome, time.monotonic() - started)

    # bullmq event listeners: synchronous on purpose (bullmq never awaits async listeners).
    def _on_completed(self, job: Job, result: Any) -> None:
        started = getattr(job, "_py_started", None)
        self._end(job, "completed")
        duration = time.monotonic() - started if started else 0.0
        # lazy: the result is encoded again only to log its size, so only when INFO is on
        logger.bind(job_id=job.id, job_name=job.name).opt(lazy=True).info(
            "Job completed: {} in {:.2f} s, result {} bytes | processed: {}, success rate: {}",
            lambda: job.id,
            lambda: duration,
            lambda: len(node_json(result).encode()),
            lambda: self.stats.processed,
            lambda: self.stats.success_rate,
        )

    def _on_failed(self, job: Job, err: BaseException) -> None:
        final = isinstance(err, UnrecoverableError) or job.attemptsMade >= int(
            job.opts.get("attempts") or 1
        )
        self._end(job, "failed" if final else "retry")
        log = logger.bind(job_id=job.id, job_name=job.name)
        if final:
            log.error("Job failed for good: {} ({})", job.id, _reason(err))
        else:
            log.warning("Job {} will be retried: {}", job.id, _reason(err))

    def _on_error(self, err: BaseException, job: Job | None = None, *args: Any) -> None:
        logger.opt(exception=err).error("Worker error: {}", _reason(err))
        if isinstance(job, Job):
            # bullmq could not record the outcome (Redis error in moveToFinished): the job
            # stays active until the stalled-job check returns it, so count it as a retry.
            self._end(job, "retry")


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
