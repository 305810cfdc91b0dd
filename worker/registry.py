"""Processors registered by job name; duplicates are refused when the registry is built."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.context import JobContext
from worker.errors import JobTypeDisabled, UnknownJobType

if TYPE_CHECKING:
    from loguru import Logger
    from redis.asyncio import Redis

Handler = Callable[[dict[str, Any], JobContext], Awaitable[Any] | Any]


@dataclass(frozen=True)
class FinalFailure:
    """What a job type's `on_final_failure` hook is told: one of its jobs failed for good.

    The job's processor is not running (it may never have run in this process): what the
    hook needs is the payload and the state the processor kept beside the job.
    """

    job_id: str
    payload: Any  # the job's data (its contract checked: an invalid payload calls no hook)
    reason: str  # the job's failedReason
    redis: Redis  # the worker's command connection
    state_key: str  # the job's JobContext.state_key
    log: Logger  # bound to the job


FinalFailureHook = Callable[[FinalFailure], Awaitable[None]]


@dataclass(frozen=True)
class ProcessorSpec:
    """One job type: its name, its handler and what an operator should know about it.

    A sync handler runs in a worker thread, so blocking SDK calls never stall the event
    loop (and with it BullMQ's lock renewal, which would let another worker run the job).
    """

    name: str
    handler: Handler
    description: str = ""
    # Lines shown at start-up and by `python -m worker check` (e.g. "budget checks off").
    notes: tuple[str, ...] = ()
    # Called once at shutdown to close clients the processor owns.
    aclose: Callable[[], Awaitable[None]] | None = None
    # A shorter per-attempt timeout than WORKER_JOB_TIMEOUT_S for this job type (None: that).
    timeout_s: float | None = None
    # Called once when a job of this type fails for good (a permanent error, its last attempt,
    # a timeout on it, the rate-limit wait cap, too many stalls), before the job is marked
    # failed: e.g. to record the failure in the app's tables. It may run again for the same
    # job (a crash before the job was marked failed), so it must be idempotent. Its own
    # failure is logged and never changes the job's reason.
    on_final_failure: FinalFailureHook | None = None
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.handler))

    async def run(self, payload: dict[str, Any], ctx: JobContext) -> Any:
        if self.is_async:
            return await self.handler(payload, ctx)
        return await asyncio.to_thread(self.handler, payload, ctx)


class Registry:
    """Job name → ProcessorSpec. `register` refuses a name twice, so a typo fails at start-up."""

    def __init__(self) -> None:
        self._specs: dict[str, ProcessorSpec] = {}
        # Job types known but not built (an optional provider's variables absent): name → why.
        self.disabled: dict[str, str] = {}

    def register(self, spec: ProcessorSpec) -> ProcessorSpec:
        if not spec.name or spec.name != spec.name.strip():
            raise ValueError(f"invalid job name {spec.name!r}")
        if spec.name in self._specs:
            raise ValueError(f"a processor for job type {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        return spec

    def disable(self, name: str, sentence: str) -> None:
        """Know `name` without a processor: its jobs fail at once with `sentence`."""
        self.disabled[name] = sentence

    def get(self, name: str) -> ProcessorSpec:
        try:
            return self._specs[name]
        except KeyError:
            if name in self.disabled:
                raise JobTypeDisabled(name, self.disabled[name]) from None
            raise UnknownJobType(name) from None

    def final_failure_hook(self, name: str) -> FinalFailureHook | None:
        """The job type's `on_final_failure`, if it is registered and has one."""
        spec = self._specs.get(name)
        return None if spec is None else spec.on_final_failure

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ProcessorSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    async def aclose(self) -> None:
        for spec in self._specs.values():
            if spec.aclose is not None:
                await spec.aclose()
