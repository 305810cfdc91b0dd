"""Counters behind /health, the WORKER STATISTICS block and /metrics (seed semantics, fixed)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    """`failed` counts jobs that failed for good; `processed` = succeeded + failed.

    The old Node worker counted attempts, so its success rate was always ~100 %; attempts
    that will be retried are counted separately in `retried`.
    """

    started_monotonic: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    succeeded: int = 0
    failed: int = 0
    retried: int = 0  # attempts that failed and will run again
    requeued: int = 0  # jobs put back to wait (rate limit, shutdown) without using an attempt
    currently_processing: int = 0
    peak_concurrency: int = 0
    last_pickup_monotonic: float | None = None
    total_duration_s: float = 0.0

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed

    @property
    def uptime_ms(self) -> int:
        return int((time.monotonic() - self.started_monotonic) * 1000)

    @property
    def success_rate(self) -> str:
        if self.processed == 0:
            return "0.0%"
        return f"{self.succeeded / self.processed * 100:.1f}%"

    @property
    def jobs_per_minute(self) -> float:
        minutes = self.uptime_ms / 60_000
        return self.processed / minutes if minutes > 0 else 0.0

    def job_started(self) -> None:
        self.currently_processing += 1
        self.peak_concurrency = max(self.peak_concurrency, self.currently_processing)
        self.last_pickup_monotonic = time.monotonic()

    def job_ended(self, outcome: str, duration_s: float) -> None:
        """outcome: completed | failed | retry | requeued."""
        self.currently_processing -= 1
        self.total_duration_s += duration_s
        if outcome == "completed":
            self.succeeded += 1
        elif outcome == "failed":
            self.failed += 1
        elif outcome == "retry":
            self.retried += 1
        elif outcome == "requeued":
            self.requeued += 1
        else:
            raise ValueError(f"unknown outcome {outcome!r}")

    def as_health(self) -> dict[str, object]:
        return {
            "processed": self.processed,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "currentlyProcessing": self.currently_processing,
            "peakConcurrency": self.peak_concurrency,
            "successRate": self.success_rate,
        }


class QueueStats(Stats):
    """One queue's counters when the service consumes several (worker/service.py): each start
    and end is also counted in the service's totals (/health, the WORKER STATISTICS block)."""

    def __init__(self, total: Stats) -> None:
        super().__init__()
        self.total = total

    def job_started(self) -> None:
        super().job_started()
        self.total.job_started()

    def job_ended(self, outcome: str, duration_s: float) -> None:
        super().job_ended(outcome, duration_s)
        self.total.job_ended(outcome, duration_s)
