"""The worker's exception hierarchy: what a processor raises decides what BullMQ does next.

    WorkerError
    ├── ConfigError              bad or missing setting at start-up; names the variable
    │   ├── ConfigErrors         several at once, each naming its variable (`each`)
    │   └── ProviderMissing      an optional provider's credentials absent: its job type is
    │                            not built, listed as disabled (start-up goes on)
    └── JobError                 raised while a job runs
        ├── PermanentJobError    fail the job now, no retry (BullMQ UnrecoverableError)
        │   ├── UnknownJobType   no processor registered for the job's name
        │   ├── JobTypeDisabled  its provider is not configured here; names the variables
        │   ├── InvalidPayload   payload breaks its contract schema; names the field path
        │   └── ContractViolation  a processor returned a result that breaks the contract (a bug)
        ├── RetryableJobError    transient: retried per the job's own attempts/backoff
        │   └── JobTimeout       the processor ran past its timeout and was cancelled
        └── Deferred             not now (a provider's breaker is open, its rate limit is
            │                    used up): the job is parked in `delayed` for `delay_s`
            │                    without using one of its attempts
            └── RateLimited      upstream said "slow down" (429): parked `retry_after_s`;
                                 such waits add up per job, and past
                                 WORKER_RATE_LIMIT_MAX_WAIT_S the job fails

Any other exception a processor raises is treated like RetryableJobError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class WorkerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(WorkerError):
    """A setting is missing or malformed; the message names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem

    @property
    def each(self) -> list[ConfigError]:
        return [self]


class ConfigErrors(ConfigError):
    """Every problem found, not the first only: one restart per fix is slow to learn from."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = [e for error in errors for e in error.each]
        super().__init__(self.errors[0].variable, self.errors[0].problem)
        self.args = ("; ".join(str(e) for e in self.errors),)

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def each(self) -> list[ConfigError]:
        return list(self.errors)


class ProviderMissing(ConfigError):
    """An optional provider is not configured: the job type is disabled, not a start-up failure.

    The message is the sentence start-up, `check` and a job of that type all show."""

    def __init__(
        self, job_name: str, providers: str | Sequence[str], variables: Sequence[str]
    ) -> None:
        """`providers`: the one missing ("Azure AI Vision") or each of several."""
        missing = [providers] if isinstance(providers, str) else list(providers)
        names = " and ".join(variables)
        verb = "is" if len(missing) == 1 else "are"  # "AWS (Polly) and Supabase are ..."
        problem = (
            f"{job_name} is disabled: {' and '.join(missing)} {verb} not configured (set {names})"
        )
        super().__init__(names, problem)
        self.job_name = job_name
        self.sentence = self.problem


class ConfigProblems:
    """Collects ConfigErrors while reading settings, to raise them all at the end."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def take(self, read: Callable[[], T]) -> T | None:
        """`read()`, or None with its ConfigError noted."""
        try:
            return read()
        except ConfigError as exc:
            self.errors.extend(exc.each)
            return None

    def add(self, variable: str, problem: str) -> None:
        self.errors.append(ConfigError(variable, problem))

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


class JobError(WorkerError):
    """Raised by the job path; subclasses say whether BullMQ retries."""


class PermanentJobError(JobError):
    """The job cannot succeed by trying again; it fails at once."""


class UnknownJobType(PermanentJobError):
    def __init__(self, name: str) -> None:
        # Exact wording is part of the contract with the web service (INTEROP §4).
        super().__init__(f"Unknown job type: {name}")
        self.job_name = name


class JobTypeDisabled(PermanentJobError):
    """A job type this worker knows but did not build: its provider's variables are absent."""

    def __init__(self, name: str, sentence: str) -> None:
        super().__init__(sentence)
        self.job_name = name


class InvalidPayload(PermanentJobError):
    """The payload breaks its schema. `path` is a JSON-pointer-like field path such as `content`."""

    def __init__(self, job_name: str, path: str, problem: str) -> None:
        where = path or "(payload)"
        super().__init__(f"Invalid payload for {job_name}: {where}: {problem}")
        self.job_name = job_name
        self.path = path
        self.problem = problem


class ContractViolation(PermanentJobError):
    """A result that breaks the contract: a bug in the worker, not in the input."""

    def __init__(self, job_name: str, path: str, problem: str) -> None:
        where = path or "(result)"
        super().__init__(f"Bug: result of {job_name} breaks the contract at {where}: {problem}")
        self.job_name = job_name
        self.path = path
        self.problem = problem


class RetryableJobError(JobError):
    """A transient failure; BullMQ retries with the job's backoff."""


class JobTimeout(RetryableJobError):
    """The attempt ran past WORKER_JOB_TIMEOUT_S (or its job type's shorter default)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"Job timed out after {timeout_s:g} s")
        self.timeout_s = timeout_s


class Deferred(JobError):
    """The job cannot run now: park it in `delayed` for `delay_s`, no attempt used.

    `refused` marks a wait the provider imposed (a 429, or the cooldown one left behind):
    those add up per job against WORKER_RATE_LIMIT_MAX_WAIT_S. Waits of our own making (the
    breaker, our RPM/TPM limits) do not; they end when the provider or the queue allows.
    """

    def __init__(
        self, delay_s: float, message: str, *, provider: str = "upstream", refused: bool = False
    ) -> None:
        super().__init__(message)
        self.delay_s = delay_s
        self.provider = provider
        self.refused = refused


class RateLimited(Deferred):
    """Upstream rate limit (429): park the job `retry_after_s` without using an attempt."""

    def __init__(
        self,
        retry_after_s: float,
        message: str = "rate limited upstream",
        *,
        provider: str = "upstream",
    ) -> None:
        super().__init__(
            retry_after_s,
            f"{message} (retry after {retry_after_s:.1f} s)",
            provider=provider,
            refused=True,
        )
        self.retry_after_s = retry_after_s
