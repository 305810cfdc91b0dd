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

from worker.context import (
    JobContext,
    ProviderUsageReporter,
    UsageReporter,
    no_provider_usage,
    no_usage,
)
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
        # (job type, provider, unit, amount) -> USD: /metrics' provider usage and cost
        self.provider_usage = provider_usage
        self._reporters_of: dict[str, tuple[UsageReporter, ProviderUsageReporter]] = {}

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
        ai_usage, provider_usage = self._reporters(job.name)
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
            ai_usage=ai_usage,
            provider_usage=provider_usage,
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

    def _reporters(self, job_type: str) -> tuple[UsageReporter, ProviderUsageReporter]:
        """The job type's usage reporters for its contexts, made once per job type."""
        reporters = self._reporters_of.get(job_type)
        if reporters is None:
            ai, provider = self.ai_usage, self.provider_usage
            reporters = self._reporters_of[job_type] = (
                functools.partial(ai, job_type) if ai is not None else no_usage,
                functools.partial(provider, job_type)
                if provider is not None
                else no_provider_usage,
            )
        return reporters

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


def state_key_for(prefix: str, queue: str) -> Callable[[str], str]:
    return functools.partial(job_state_key, prefix, queue)
