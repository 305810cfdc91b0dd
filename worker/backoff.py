"""Repeated Redis errors: a capped, jittered exponential pause per failing path (fetch, finish,
each chore), a summary log line instead of one per attempt, and a verdict once one path has
failed without a break for WORKER_REDIS_GIVE_UP_S, so the platform restarts the process.

Before, a persistent error (a wrong cluster node's MOVED, a read-only replica) was retried every
second by each slot and logged each time, and the process never exited.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

# The first pause, and the longest: a Redis back after a failover is used within 10 s.
BASE_S = 0.5
CAP_S = 10.0
# While a path keeps failing with the same error, one summary line this often.
SUMMARY_EVERY_S = 30.0


@dataclass
class _Streak:
    """Failures of one path since its last success."""

    since: float
    errors: int = 0
    last: str = ""
    said: str = ""  # the error last logged
    said_at: float = 0.0


class RedisBackoff:
    """Shared by the slots and chores of one JobLoop; each path has its own streak."""

    def __init__(
        self,
        give_up_s: float,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.give_up_s = give_up_s
        self._clock = clock
        self._jitter = jitter
        self._streaks: dict[str, _Streak] = {}
        self.gave_up: str | None = None  # why, once a path failed for give_up_s

    def failed(self, path: str, exc: BaseException) -> float:
        """Note a failure of `path`; returns the pause before `path` tries again."""
        now = self._clock()
        streak = self._streaks.get(path)
        if streak is None:
            streak = self._streaks[path] = _Streak(since=now)
        streak.errors += 1
        streak.last = reason = _reason(exc)
        failing_s = now - streak.since
        if reason != streak.said:
            streak.said, streak.said_at = reason, now
            logger.warning(
                "Redis error in {}: {} (backing off up to {:g} s; the worker exits after {:g} s"
                " of failure)",
                path, reason, CAP_S, self.give_up_s,
            )  # fmt: skip
        elif now - streak.said_at >= SUMMARY_EVERY_S:
            streak.said_at = now
            logger.warning(
                "Redis still failing in {} for {:.0f} s: {} error(s), last: {}",
                path, failing_s, streak.errors, reason,
            )  # fmt: skip
        if failing_s >= self.give_up_s and self.gave_up is None:
            self.gave_up = (
                f"Redis failed without a break for {failing_s:.0f} s in {path} "
                f"(WORKER_REDIS_GIVE_UP_S={self.give_up_s:g}): {reason}"
            )
            logger.error("Giving up: {}", self.gave_up)
        full: float = min(CAP_S, BASE_S * 2.0 ** min(streak.errors - 1, 30))
        return full * (0.5 + self._jitter() / 2)  # jitter: replicas do not retry in step

    def succeeded(self, path: str) -> None:
        """`path` worked: its streak ends (said once, when there was one)."""
        if not self._streaks:
            return  # the hot path: nothing is failing
        streak = self._streaks.pop(path, None)
        if streak is not None:
            logger.info(
                "Redis answers again in {} after {:.1f} s ({} error(s))",
                path, self._clock() - streak.since, streak.errors,
            )  # fmt: skip

    @property
    def problem(self) -> str | None:
        """What fails now, for /ready; None when every path's last attempt worked."""
        if not self._streaks:
            return None
        now = self._clock()
        path, streak = min(self._streaks.items(), key=lambda item: item[1].since)
        return f"{path} failing for {now - streak.since:.0f} s: {streak.last}"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
