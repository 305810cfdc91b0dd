"""Capacity at a glance for `python -m worker stats --capacity`: recent completion rates from
BullMQ's own per-minute metrics, the backlog, how long it takes to drain, and how many
replicas would drain it within a target.

BullMQ keeps, per queue and outcome, a hash `<prefix>:<queue>:metrics:<completed|failed>`
(`count`, `prevTS`, `prevCount`) and a list `…:data` of per-minute counts, newest first
(moveToFinished's `collectMetrics`). A minute's point is pushed when a job finishes in a later
minute; the minute of `prevTS` is still open (`count - prevCount` so far), and minutes after it
with no job have no point yet. Workers record them when started with the `metrics` option
(Node) or WORKER_METRICS_MAX_DATA_POINTS > 0 (this worker, on by default).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

WINDOWS_MIN = (5, 60)


@dataclass(frozen=True)
class MinuteCounts:
    """One outcome's metrics as stored: the open minute's start and count, closed minutes."""

    prev_ts_ms: int | None  # None: nothing recorded
    open_count: int  # finished in the minute of prev_ts_ms so far
    closed: list[int]  # the minutes before it, newest first

    @classmethod
    def from_redis(cls, meta: list[Any], points: list[Any]) -> MinuteCounts:
        count, prev_ts, prev_count = (int(v) if v is not None else None for v in meta)
        if prev_ts is None:
            return cls(None, 0, [])
        return cls(prev_ts, (count or 0) - (prev_count or 0), [int(p) for p in points])

    def finished_within(self, minutes: int, now_ms: int) -> int:
        """Jobs finished in the last `minutes` whole minutes, this one included."""
        if self.prev_ts_ms is None:
            return 0
        gap = now_ms // 60_000 - self.prev_ts_ms // 60_000  # idle minutes since the open one
        if gap >= minutes:
            return 0
        closed = self.closed[: max(minutes - gap - 1, 0)]
        return self.open_count + sum(closed)


def capacity_report(
    completed: MinuteCounts,
    failed: MinuteCounts,
    backlog: int,
    workers: int,
    drain_within_min: float,
    now_ms: int | None = None,
) -> dict[str, Any]:
    """The figures an operator scales by. Rates are per minute over each window."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    recorded = completed.prev_ts_ms is not None or failed.prev_ts_ms is not None
    rates = {
        f"{w}m": {
            "completed": round(completed.finished_within(w, now_ms) / w, 2),
            "failed": round(failed.finished_within(w, now_ms) / w, 2),
        }
        for w in WINDOWS_MIN
    }
    per_min = rates["5m"]["completed"] + rates["5m"]["failed"]  # what the workers get through
    report: dict[str, Any] = {
        "metricsRecorded": recorded,
        "perMinute": rates,
        "backlog": backlog,
        "workers": workers,
        "drainMinutes": round(backlog / per_min, 1) if per_min else None,
        "drainWithinMinutes": drain_within_min,
        "workersToDrainWithin": None,
    }
    if backlog == 0:
        report["drainMinutes"] = 0.0
        report["workersToDrainWithin"] = min(workers, 1) if workers else 0
    elif per_min and workers:
        per_worker = per_min / workers
        report["workersToDrainWithin"] = math.ceil(backlog / (per_worker * drain_within_min))
    return report


def parse_minutes(text: str) -> float:
    """`10m`, `90s`, `1h` or a bare number of minutes."""
    text = text.strip().lower()
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    factor = units.get(text[-1:], None)
    number = text[:-1] if factor is not None else text
    try:
        value = float(number) * (factor or 1.0)
    except ValueError:
        raise ValueError(f"expected a duration such as 10m, 90s or 1h, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"the duration must be positive, got {text!r}")
    return value
