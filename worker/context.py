"""The small typed context a processor receives beside its validated payload."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loguru import Logger
    from redis.asyncio import Redis

    from worker.joblog import JobLogger

ProgressSetter = Callable[[int | dict[str, Any]], Awaitable[None]]
# ctx.ai_usage(model, input_tokens, output_tokens): after each billed AI call, for /metrics.
UsageReporter = Callable[[str, int, int], None]
# ctx.provider_usage(provider, unit, amount) -> estimated USD: after each billed call of a
# provider that bills by something else than tokens (images, characters, audio seconds).
ProviderUsageReporter = Callable[[str, str, float], float]


def no_usage(model: str, input_tokens: int, output_tokens: int) -> None:
    """Where nothing counts tokens (a context built by hand, a dispatcher without metrics)."""


def no_provider_usage(provider: str, unit: str, amount: float) -> float:
    """Where nothing counts provider usage (as `no_usage`)."""
    return 0.0


@dataclass(frozen=True)
class JobContext:
    """What a processor may know about the job it runs; never the raw job hash."""

    job_id: str
    name: str
    attempt: int  # 1-based number of this run (1 on the first try)
    max_attempts: int
    progress: ProgressSetter  # await ctx.progress(50): visible to Node's job.progress
    # loguru's logger with the job bound; INFO and up also reach the job's BullMQ log
    log: JobLogger | Logger
    redis: Redis  # the worker's command connection, for per-job state kept beside the job
    state_key: str  # where this job may keep resumable state: `<prefix>:<queue>:<job id>:py-state`
    worker: Mapping[str, Any] = field(
        default_factory=dict
    )  # identity: host, pid, worker id, version
    ai_usage: UsageReporter = no_usage  # tokens by model: /metrics' tokens and cost counters
    # images read, characters synthesised, audio seconds assessed: /metrics' usage and cost
    provider_usage: ProviderUsageReporter = no_provider_usage

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts
