"""One loguru setup for the process: text or JSON lines, job context on every line, no secrets.

Lines leave without blocking the caller: the sink queues what each line needs and a writer
thread formats, redacts and writes them in batches (QueuedSink). `flush_logs()` waits until all
queued lines are written; exit, an unhandled exception and `logger.remove()` flush too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from loguru import logger

# Environment variables whose values must never reach a log line, whatever prints them.
SECRET_VARIABLES = (
    "REDIS_PASSWORD",
    "EXPO_PUBLIC_OPENAI_API_KEY",
    "OPENAI_API_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "EXPO_PUBLIC_SUPABASE_ANON_KEY",
    "SUPABASE_ANON_KEY",
    "AZURE_SPEECH_KEY",
    "AZURE_VISION_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
)

CONTEXT_FIELDS = ("job_id", "job_name", "attempt")


class Redactor:
    """Replaces every known secret value with `***` in a finished log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a URL is masked whole before the password inside it.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


# Redis URLs are not secret as a whole (the address helps an operator); the password in them is.
REDIS_URL_VARIABLES = ("REDIS_PUBLIC_URL", "REDIS_URL")


def secrets_from_env(env: Mapping[str, str], extra: Iterable[str | None] = ()) -> list[str]:
    values = [env.get(name, "") for name in SECRET_VARIABLES]
    for name in REDIS_URL_VARIABLES:
        values.extend(_url_passwords(env.get(name, "")))
    values.extend(v for v in extra if v)
    return [v for v in values if v]


def _url_passwords(url: str) -> list[str]:
    """The password in a URL, as written (percent-encoded) and decoded."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return [url]  # unparseable: mask it whole rather than guess where the password is
    return [password, unquote(password)] if password else []


class _InterceptHandler(logging.Handler):
    """Routes stdlib logging (bullmq, redis, aiohttp, httpx, openai) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


# What the text sink keeps of a record: time, level name, job id, and loguru's rendering of
# "{message}\n{exception}" (the exception's traceback when there is one).
_TextItem = tuple[Any, str, Any, str]


def _text_line(item: _TextItem) -> str:
    """`2024-05-01 12:00:00.123 | INFO    | [<job id>] <message>`, the job id only in a job."""
    ts, level, job_id, rendered = item
    stamp = ts.isoformat(" ", "milliseconds")[:23]  # loguru's YYYY-MM-DD HH:mm:ss.SSS, local
    if job_id:
        return f"{stamp} | {level: <7} | [{job_id}] {rendered}"
    return f"{stamp} | {level: <7} | {rendered}"


# What the JSON sink keeps of a record: time, level name, message, extra (a copy), error summary.
_JsonItem = tuple[Any, str, str, dict[str, Any], str | None]


def _error_summary(record: Any) -> str | None:
    exc = record["exception"]
    if exc is None:
        return None
    return f"{exc.type.__name__ if exc.type else 'Error'}: {exc.value}"


def _json_line(item: _JsonItem) -> str:
    ts, level, message, extra, error = item
    payload: dict[str, Any] = {
        "ts": ts.isoformat(timespec="milliseconds"),
        "level": level,
        "message": message,
    }
    payload.update(extra)
    if error is not None:
        payload["error"] = error
    try:
        line = json.dumps(payload, ensure_ascii=False, default=str)
    except Exception as exc:  # an extra value that cannot be shown: keep the line without them
        payload = {"ts": payload["ts"], "level": level, "message": message}
        payload["log_error"] = f"extra not serialisable: {type(exc).__name__}"
        if error is not None:
            payload["error"] = error
        line = json.dumps(payload, ensure_ascii=False, default=str)
    return line + "\n"


class _Flushed(threading.Event):
    """Queued behind the lines to flush; set once they are written."""


_STOP = object()
# Lines per write: bounds one write's size when the writer falls behind.
_BATCH_LINES = 1024
# Queued lines at which a logging call waits for the writer (a stalled stderr reader): memory
# stays bounded and no line is dropped, as when each call wrote for itself.
_HIGH_WATER = 50_000
# Once woken by a line, the writer waits this long for more before writing. Without it, on an
# event loop that waits in epoll between jobs, the writer woke for every line and the thread
# hand-offs cost more CPU than the writes saved (bench/log_cost.py --io). Lines leave within it.
_COALESCE_S = 0.002


class QueuedSink:
    """A loguru sink that takes lines off the caller's thread: loguru renders the message, the
    sink queues it with the record fields the line needs (O(1), under loguru's lock) and a daemon
    thread writes what is queued in batches: formatted, joined, redacted, one write and one
    flush per batch, in order.

    `drain()` blocks until every line queued before it is written; `stop()` (loguru calls it
    on `logger.remove()`, and at exit) drains and ends the thread. There is no `flush` method on
    purpose: loguru would call it after every line.
    """

    encoding = "utf8"  # what loguru assumes for callable sinks; it renders tracebacks with it

    def __init__(self, out: TextIO, redact: Redactor, log_format: str = "text") -> None:
        self.name = f"queued<{getattr(out, 'name', type(out).__name__)}>"
        self._out = out
        self._redact = redact
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._put = self._queue.put
        self._qsize = self._queue.qsize
        json_lines = self._json = log_format == "json"
        # `write` is an attribute, not a method: one capture per format, nothing to test per line.
        self.write: Callable[[Any], None] = self._put_json if json_lines else self._put_text
        self._render: Callable[[Any], str] = _json_line if json_lines else _text_line
        self._lock = threading.Lock()  # one writer at a time: the thread, or a drain without it
        self._stopped = False
        self._error_reported = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    # The hot path: called by loguru for every line that passes the level. Only what the line
    # needs is kept (not the record: its traceback holds frames); the writer formats it.
    def _put_text(self, message: Any) -> None:
        record = message.record
        item: _TextItem = (
            record["time"],
            record["level"].name,
            record["extra"].get("job_id"),
            str(message),
        )
        self._put(item)
        if self._qsize() > _HIGH_WATER:
            self.drain()

    def _put_json(self, message: Any) -> None:
        record = message.record
        item: _JsonItem = (
            record["time"],
            record["level"].name,
            record["message"],
            dict(record["extra"]),
            _error_summary(record),
        )
        self._put(item)
        if self._qsize() > _HIGH_WATER:
            self.drain()

    def put_job_line(self, message: str, job_id: str, job_name: str, attempt: int) -> None:
        """An INFO line about a job, queued as loguru's records of the same line would be."""
        now = datetime.now().astimezone()
        if self._json:
            self._put((now, "INFO", message, {"job_id": job_id, "job_name": job_name,
                                             "attempt": attempt}, None))  # fmt: skip
        else:
            self._put((now, "INFO", job_id, message + "\n"))  # as loguru renders "{message}"
        if self._qsize() > _HIGH_WATER:
            self.drain()

    def drain(self) -> None:
        """Return once every line queued before this call has reached the stream (flushed)."""
        if threading.current_thread() is self._thread:
            return  # the writer itself (its stream logged?): it cannot wait for itself
        done = _Flushed()
        self._put(done)
        while not done.wait(0.05):
            if not self._thread.is_alive():  # stopped, forked, or died: write it here
                self._write_queued()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Write everything queued, then end the writer thread (loguru: `logger.remove()`)."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._put(_STOP)
            self._thread.join()
        self._write_queued()  # anything queued behind the stop

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        running = True
        while running:
            items = [get()]
            if type(items[0]) is not _Flushed and items[0] is not _STOP:
                time.sleep(_COALESCE_S)  # a flush or a stop is waited for: no pause
            try:
                while len(items) < _BATCH_LINES:
                    items.append(get_nowait())
            except queue.Empty:
                pass
            with self._lock:
                try:
                    running = self._write_items(items)
                except Exception as exc:  # a bug here must not strand the lines behind it
                    self._report(f"log writer failed on {len(items)} item(s): {exc!r}")
                    running = not any(item is _STOP for item in items)
                    for item in items:
                        if isinstance(item, _Flushed):
                            item.set()

    def _write_queued(self) -> None:
        """Write what is queued from the calling thread (used when the writer thread is gone)."""
        with self._lock:
            while True:
                items: list[object] = []
                try:
                    while len(items) < _BATCH_LINES:
                        items.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
                if not items:
                    return
                self._write_items(items)

    def _write_items(self, items: list[object]) -> bool:
        """Write the lines among `items` in order, release the drains; False after a stop."""
        lines: list[str] = []
        running = True
        render = self._render
        for item in items:
            if type(item) is tuple:
                lines.append(render(item))
            elif isinstance(item, _Flushed):
                self._emit(lines)
                lines = []
                item.set()
            elif item is _STOP:
                running = False
        self._emit(lines)
        return running

    def _emit(self, lines: list[str]) -> None:
        if not lines:
            return
        # Redacting the joined batch finds every secret in every line: joining only puts lines
        # side by side, it splits none (at worst a secret with a line break in it spans two).
        text = self._redact("".join(lines))
        try:
            self._out.write(text)
            self._out.flush()
        except Exception as exc:  # as loguru's catch=True did: say so, keep the process
            self._report(f"log writer could not write {len(lines)} line(s): {exc!r}")

    def _report(self, text: str) -> None:
        if self._error_reported:  # once: a closed stream would otherwise say it per batch
            return
        self._error_reported = True
        with contextlib.suppress(Exception):
            print(f"--- {text} ---", file=sys.__stderr__, flush=True)


_sink: QueuedSink | None = None
_exit_hooks_installed = False


_job_lines = False  # whether INFO passes the configured level


def job_lines_on() -> bool:
    """Whether the per-job INFO lines are wanted: build them only then."""
    return _job_lines


def job_line(message: str, job_id: str, job_name: str, attempt: int) -> None:
    """A per-job INFO line (picked up, completed) straight onto the sink's queue.

    Two such lines per job went through loguru at ~25 us each (its record: frame, time,
    context, level checks) on the event loop; here a line costs a few microseconds and reads
    the same. Without a configured sink (a library use, some tests) it goes through loguru.
    """
    sink = _sink
    if sink is None or sink.stopped:
        logger.info(message)
        return
    sink.put_job_line(message, job_id, job_name, attempt)


def flush_logs() -> None:
    """Block until every line logged so far is written and flushed (before exit, in tests)."""
    sink = _sink
    if sink is not None:
        sink.drain()


def _excepthook(
    exc_type: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    # An unhandled exception: the log lines that led to it go out before its traceback.
    with contextlib.suppress(Exception):
        flush_logs()
    _previous_excepthook(exc_type, value, tb)


_previous_excepthook = sys.excepthook


def _install_exit_hooks() -> None:
    global _exit_hooks_installed, _previous_excepthook
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(flush_logs)  # loguru's own atexit logger.remove() then stops the sink
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook


def setup_logging(
    log_format: str = "text",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Configure loguru once; returns the redactor so callers can mask text they print.

    Lines go through a QueuedSink: call `flush_logs()` before reading `stream` or exiting
    with `os._exit`; a normal exit (an unhandled exception included) flushes by itself.
    """
    global _sink, _job_lines
    redact = Redactor(secrets)
    out = stream or sys.stderr
    logger.remove()  # stops (drains) the previous QueuedSink
    sink = QueuedSink(out, redact, "json" if log_format == "json" else "text")
    _sink = sink
    _job_lines = logger.level(level).no <= logger.level("INFO").no
    _install_exit_hooks()

    # loguru renders only "{message}\n{exception}" (its own time format costs ~10 µs per job
    # on the caller's thread); the sink's writer thread adds the time, level and job id.
    logger.add(
        sink,
        level=level,
        format="{message}",
        backtrace=False,
        diagnose=False,  # diagnose would print local variables, secrets included
        colorize=False,
        catch=True,
    )

    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    logging.captureWarnings(True)
    return redact
