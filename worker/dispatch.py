"""Runs one job's processor: route by name, validate, run under its timeout, check the result.

It knows no BullMQ: it takes a decoded job and returns a JSON-safe result or raises one of
worker/errors.py's exceptions; the run loop (worker/loop.py) turns that into a transition.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from worker.context import JobContext, ProviderUsageReporter, UsageReporter
from worker.errors import JobTimeout
from worker.joblog import JobLog, JobLogger
from worker.keys import IDEMPOTENCY_TTL_S, job_state_key
from worker.results import node_json, to_json_safe

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.contract import Contract
    from worker.protocol import ActiveJob
    from worker.registry import Registry


class ProgressWriter(Protocol):
    """`QueueProtocol.update_progress`: the progress, and the job log's pending lines."""

    def __call__(self, job_id: str, progress: Any, log: JobLog | None = None) -> Awaitable[None]:
        """Write it to the job."""


class Dispatcher:
    """`await dispatcher.run(job)`: the processor's JSON-safe, contract-checked result."""

    def __init__(
        self,
        registry: Registry,
        contract: Contract,
        identity: Mapping[str, Any],
        redis: Redis,
        state_key: Callable[[str], str],
        progress: ProgressWriter,
        job_timeout_s: float,
        redact: Callable[[str], str] = str,
        ai_usage: Callable[[str, str, int, int], None] | None = None,
        provider_usage: Callable[[str, str, str, float], float] | None = None,
    ) -> None:
        self.registry = registry
        self.contract = contract
        self.identity = dict(identity)
        self.redis = redis
        self.state_key = state_key
        self.progress = progress
        self.job_timeout_s = job_timeout_s
        self.redact = redact  # secrets out of the job's BullMQ log (worker/logs.py Redactor)
        self.ai_usage = ai_usage  # (job type, model, input, output tokens) -> /metrics
        self._usage_of: dict[str, UsageReporter] = {}
        # (job type, provider, unit, amount) -> USD: /metrics' provider usage and cost
        self.provider_usage = provider_usage
        self._provider_usage_of: dict[str, ProviderUsageReporter] = {}

    def timeout_for(self, name: str) -> float:
        """WORKER_JOB_TIMEOUT_S, or the processor's own shorter default for its job type."""
        spec_timeout = self.registry.get(name).timeout_s
        if spec_timeout is None:
            return self.job_timeout_s
        return min(spec_timeout, self.job_timeout_s)

    async def run(self, job: ActiveJob, log: JobLog | None = None) -> Any:
        """The processor's result; `log` collects the attempt's BullMQ log lines."""
        spec = self.registry.get(job.name)  # UnknownJobType: permanent
        data = job.data  # `null` stays null: the contract fails it as not an object
        # Start-up refuses a processor without a schema; only tests register such processors.
        checked = self.contract.has(job.name)
        if checked:
            self.contract.validate_payload(job.name, data)  # InvalidPayload: permanent
        ctx = JobContext(
            job_id=job.id,
            name=job.name,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            progress=functools.partial(self.progress, job.id, log=log),
            log=JobLogger(
                logger.bind(job_id=job.id, job_name=job.name, attempt=job.attempt), log, self.redact
            ),
            redis=self.redis,
            state_key=self.state_key(job.id),
            worker=self.identity,
            ai_usage=self._usage_reporter(job.name),
            provider_usage=self._provider_usage_reporter(job.name),
        )
        timeout_s = self.timeout_for(job.name)
        try:
            async with asyncio.timeout(timeout_s) as limit:
                raw = await spec.run(data, ctx)
        except TimeoutError:
            if limit.expired():  # ours, not a TimeoutError the processor raised itself
                raise JobTimeout(timeout_s) from None
            raise
        result = to_json_safe(raw)  # UnsafeResult: permanent
        if checked:
            self.contract.validate_result(job.name, result)  # ContractViolation: permanent
        await self._write_idempotency(job, result)
        return result

    def _usage_reporter(self, job_type: str) -> UsageReporter:
        reporter = self._usage_of.get(job_type)
        if reporter is None:
            if self.ai_usage is None:
                return _ignore_usage
            reporter = self._usage_of[job_type] = functools.partial(self.ai_usage, job_type)
        return reporter

    def _provider_usage_reporter(self, job_type: str) -> ProviderUsageReporter:
        reporter = self._provider_usage_of.get(job_type)
        if reporter is None:
            if self.provider_usage is None:
                return _ignore_provider_usage
            reporter = functools.partial(self.provider_usage, job_type)
            self._provider_usage_of[job_type] = reporter
        return reporter

    async def _write_idempotency(self, job: ActiveJob, result: Any) -> None:
        """INTEROP §3: SETEX before the job is marked completed; a failure never fails the job."""
        key = job.opts.get("idempotencyKey")
        if not key:
            return
        value = node_json({"jobId": job.id, "result": result, "cachedAt": int(time.time() * 1000)})
        try:
            await self.redis.set(str(key), value, ex=IDEMPOTENCY_TTL_S)
        except Exception as exc:
            logger.warning("Could not write idempotency key {}: {}", key, exc)


def _ignore_usage(model: str, input_tokens: int, output_tokens: int) -> None:
    """No metrics to feed (a dispatcher built without them)."""


def _ignore_provider_usage(provider: str, unit: str, amount: float) -> float:
    """No metrics to feed (a dispatcher built without them)."""
    return 0.0


def state_key_for(prefix: str, queue: str) -> Callable[[str], str]:
    return functools.partial(job_state_key, prefix, queue)
