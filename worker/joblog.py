"""A job's BullMQ log, as Node's `job.log(line)` keeps it: what Bull Board's Logs tab and
`queue.getJobLogs(id)` show. One line when an attempt starts, one when it ends, and what the
processor logs through `ctx.log` at INFO and above, secrets masked.

Lines are not written one by one: an attempt's lines wait in its `JobLog` and go to Redis
inside a write that touches the job anyway (the finishing script, a retry, a progress update;
worker/protocol.py), so the log costs no round trip of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loguru import Logger

# A line longer than this is cut: one runaway message must not fill the job's log.
MAX_LINE_CHARS = 2000
JOB_LOG_LEVELS = frozenset({"INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"})


class JobLog:
    """One attempt's lines not yet written; at most `keep` of them (the job's `keepLogs`)."""

    __slots__ = ("dropped", "keep", "lines")

    def __init__(self, keep: int, first: str) -> None:
        self.keep = keep
        self.lines = [first]
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(line) > MAX_LINE_CHARS:
            line = line[: MAX_LINE_CHARS - 1] + "…"
        if len(self.lines) < self.keep - 1:  # room is kept for the attempt's last line
            self.lines.append(line)
        else:
            self.dropped += 1

    def end(self, line: str) -> None:
        """The attempt's last line: always kept."""
        if self.dropped:
            self.lines.append(f"({self.dropped} line(s) left out: more than keepLogs)")
            self.dropped = 0
        self.lines.append(line)

    def take(self) -> list[str]:
        """The lines to write now (emptied: each line is written once)."""
        lines, self.lines = self.lines, []
        return lines


class JobLogger:
    """`ctx.log`: loguru's logger bound to the job; what it logs at INFO and above also goes
    to the job's BullMQ log (when there is one), masked by the process's redactor.

    A wrapper rather than a loguru sink: a sink taking INFO would make loguru build every
    INFO record of the worker even when the console shows WARNING and up.
    """

    __slots__ = ("_bound", "_log", "_redact")

    def __init__(self, bound: Logger, log: JobLog | None, redact: Callable[[str], str]) -> None:
        self._bound = bound
        self._log = log
        self._redact = redact

    def bind(self, **extra: Any) -> JobLogger:
        return JobLogger(self._bound.bind(**extra), self._log, self._redact)

    def log(self, level: str, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit(level, message, args, kwargs)

    def trace(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("TRACE", message, args, kwargs)

    def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("DEBUG", message, args, kwargs)

    def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("INFO", message, args, kwargs)

    def success(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("SUCCESS", message, args, kwargs)

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("WARNING", message, args, kwargs)

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("ERROR", message, args, kwargs)

    def critical(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._emit("CRITICAL", message, args, kwargs)

    def exception(self, message: str, *args: Any, **kwargs: Any) -> None:
        self._bound.opt(depth=1, exception=True).error(message, *args, **kwargs)
        self._to_job_log("ERROR", message, args, kwargs)

    def _emit(self, level: str, message: str, args: Any, kwargs: Any) -> None:
        self._bound.opt(depth=2).log(level, message, *args, **kwargs)
        self._to_job_log(level, message, args, kwargs)

    def _to_job_log(self, level: str, message: str, args: Any, kwargs: Any) -> None:
        if self._log is None or level not in JOB_LOG_LEVELS:
            return
        try:  # loguru's own formatting: str.format, only when there are arguments
            text = message.format(*args, **kwargs) if args or kwargs else message
        except (IndexError, KeyError, ValueError):
            text = message
        self._log.add(f"{level}: {self._redact(str(text))}")
