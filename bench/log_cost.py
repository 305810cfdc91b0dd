"""What the per-job log lines cost the event loop: the old synchronous sink against worker.logs.

    python bench/log_cost.py [--jobs 20000] [--rounds 5] [--formats text,json] [--io] [--merged]

Each measurement runs in a fresh child process set up as `python -m worker` sets up logging
(`setup_logging(format, level, secrets)`, stderr) with its stderr a pipe that this process reads
and throws away, as a log collector would. The child makes, per job, the calls
worker/dispatch.py makes: `logger.contextualize(job_id, job_name, attempt)` around "Job picked
up", "Currently processing" and the lazy "Processing job | ... | Started: <ISO time>" line, then
the bound, lazy "Job completed" line of the completion listener. In a tight loop by default;
with `--io` each job follows a round trip to another process on the worker's event loop (uvloop
when installed), as a worker's jobs follow Redis replies: the loop waits in epoll between jobs,
which is when a writer thread gets to run (and, if it is woken per line, where its hand-offs
cost). `--merged` measures a proposal instead of what dispatch.py does: the three pick-up lines
as one, without the ISO "Started" time (every line carries its time already), 2 calls per job.

Sinks: `sync` is the sink worker/logs.py had before the queued one (format, redact, write,
flush, on the caller's thread), copied here so it can still be measured; `current` is whatever
worker/logs.py now installs. Per job: `main`, the CPU time of the thread that logs (what the
event loop spends); `process`, the process's CPU time (a writer thread's included); `wall`; all
three until the last line has been flushed. Min and median of the rounds, run round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Secrets of the lengths a deployment has (API keys, a Redis password): redaction runs on them.
SECRETS = [
    "sk-proj-" + "x" * 48,
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + "y" * 80,
    "redis-password-0123456789",
    "azure-speech-key-abcdef0123456789",
    "aws-secret-" + "z" * 29,
]
SINKS = ("sync", "current")
LEVELS = ("INFO", "WARNING")


def _iso_now() -> str:  # worker/dispatch.py's
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_format(record: Any) -> str:
    extra = record["extra"]
    context = "[{extra[job_id]}] " if extra.get("job_id") else ""
    return "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | " + context + "{message}\n{exception}"


def setup_sync_sink(log_format: str, level: str) -> None:
    """worker/logs.py's setup_logging before the queued sink (f4fff20), unchanged in effect."""
    from loguru import logger

    from worker.logs import Redactor

    redact = Redactor(SECRETS)
    out = sys.stderr
    logger.remove()
    if log_format == "json":

        def json_sink(message: Any) -> None:
            record = message.record
            payload: dict[str, Any] = {
                "ts": record["time"].isoformat(timespec="milliseconds"),
                "level": record["level"].name,
                "message": record["message"],
            }
            payload.update(record["extra"])
            if record["exception"] is not None:
                exc = record["exception"]
                payload["error"] = f"{exc.type.__name__ if exc.type else 'Error'}: {exc.value}"
            line = json.dumps(payload, ensure_ascii=False, default=str)
            out.write(redact(line) + "\n")
            out.flush()

        logger.add(json_sink, level=level, backtrace=False, diagnose=False, catch=True)
    else:

        def text_sink(message: Any) -> None:
            out.write(redact(str(message)))
            out.flush()

        logger.add(
            text_sink,
            level=level,
            format=_text_format,
            backtrace=False,
            diagnose=False,
            colorize=False,
            catch=True,
        )


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from loguru import logger

    from worker.cli import event_loop_factory
    from worker.results import node_json

    if args.sink == "sync":
        setup_sync_sink(args.format, args.level)

        def flush() -> None:
            pass
    else:
        from worker import logs

        logs.setup_logging(args.format, args.level, SECRETS)
        flush = getattr(logs, "flush_logs", lambda: None)

    stats = SimpleNamespace(currently_processing=1, processed=0, success_rate="100.00%")
    result = {"ok": True, "echo": "hello"}

    def completed(job_id: str, name: str) -> None:
        """The completion line, as both variants log it."""
        duration = 0.0012
        stats.processed += 1
        logger.bind(job_id=job_id, job_name=name).opt(lazy=True).info(
            "Job completed: {} in {:.2f} s, result {} bytes | processed: {}, success rate: {}",
            lambda: job_id,
            lambda: duration,
            lambda: len(node_json(result).encode()),
            lambda: stats.processed,
            lambda: stats.success_rate,
        )

    def two_lines(i: int) -> None:  # --merged: a proposal, not what dispatch.py does
        job_id = f"ping-1712345678901-{i:x}abc"
        name, attempt, max_attempts = "ping", 1, 3
        with logger.contextualize(job_id=job_id, job_name=name, attempt=attempt):
            logger.info(
                "Job picked up: {} ({}) | Attempt: {}/{} | Currently processing: {} jobs",
                job_id,
                name,
                attempt,
                max_attempts,
                stats.currently_processing,
            )
        completed(job_id, name)

    def one_job(i: int) -> None:
        job_id = f"ping-1712345678901-{i:x}abc"
        name, attempt, max_attempts = "ping", 1, 3
        with logger.contextualize(job_id=job_id, job_name=name, attempt=attempt):
            logger.info("Job picked up: {} ({})", job_id, name)
            logger.info("Currently processing: {} jobs", stats.currently_processing)
            logger.opt(lazy=True).info(
                "Processing job | Job ID: {} | Job Type: {} | Attempt: {}/{} | Started: {}",
                lambda: job_id,
                lambda: name,
                lambda: attempt,
                lambda: max_attempts,
                _iso_now,
            )
        completed(job_id, name)

    job = two_lines if args.merged else one_job
    if args.io:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # uvloop, as the worker
            figures = runner.run(with_round_trips(args.jobs, job, flush))
    else:
        for i in range(min(2000, args.jobs)):  # warm-up: caches, the writer thread, the pipe
            job(i)
        flush()
        with Clock(args.jobs, flush) as figures:
            for i in range(args.jobs):
                job(i)
    print(json.dumps(figures), flush=True)


class Clock(dict[str, float]):
    """µs per job: `main`, the calling thread's CPU time (what the event loop spends); `cpu`,
    the process's (the writer thread's included) and `wall`, both until the last line is out."""

    def __init__(self, jobs: int, flush: Any) -> None:
        super().__init__()
        self.jobs, self.flush = jobs, flush

    def __enter__(self) -> Clock:
        self.t0 = (time.thread_time(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        main = time.thread_time()
        self.flush()
        t1 = (main, time.process_time(), time.perf_counter())
        for key, a, b in zip(("main", "cpu", "wall"), self.t0, t1, strict=True):
            self[key] = (b - a) / self.jobs * 1e6


ECHO = "\n".join(
    (
        "import sys",
        "for line in sys.stdin.buffer:",
        " sys.stdout.buffer.write(line)",
        " sys.stdout.flush()",
    )
)


async def with_round_trips(jobs: int, one_job: Any, flush: Any) -> Clock:
    """The jobs on an event loop, each after a round trip to another process, as a worker's job
    follows a Redis reply: the loop waits in epoll between jobs, where a writer thread runs."""
    echo = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ECHO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert echo.stdin is not None and echo.stdout is not None

    async def round_trip() -> None:
        echo.stdin.write(b"PING\n")
        await echo.stdout.readline()

    for i in range(min(2000, jobs)):
        await round_trip()
        one_job(i)
    flush()
    with Clock(jobs, flush) as figures:
        for i in range(jobs):
            await round_trip()
            one_job(i)
    echo.stdin.close()
    await echo.wait()
    return figures


def measure(
    sink: str, level: str, log_format: str, args: argparse.Namespace
) -> tuple[dict[str, float], int]:
    """One child; returns its figures and how many bytes it wrote to stderr."""
    cmd = [sys.executable, __file__, "--child", "--sink", sink, "--level", level]
    cmd += ["--format", log_format, "--jobs", str(args.jobs)]
    cmd += ["--io"] * args.io + ["--merged"] * args.merged
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    written = 0

    def drain() -> None:  # the log collector: reads the pipe as fast as it fills
        nonlocal written
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(1 << 16):
            written += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    code = proc.wait()
    reader.join()
    if code != 0:
        raise SystemExit(f"child failed ({code}): {' '.join(cmd)}")
    return json.loads(out), written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--formats", default="text,json")
    p.add_argument("--io", action="store_true", help="a round trip to another process per job")
    p.add_argument(
        "--merged", action="store_true", help="2 lines per job: the 3 pick-up lines merged in one"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sink", choices=SINKS, default="current", help=argparse.SUPPRESS)
    p.add_argument("--level", default="INFO", help=argparse.SUPPRESS)
    p.add_argument("--format", default="text", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    mode = "a round trip to another process per job" if args.io else "a tight loop"
    calls = "2 log calls (--merged)" if args.merged else "4 log calls"
    print(f"{args.jobs} jobs x {calls} in {mode}; µs per job, min / median of {args.rounds}")
    head = ("format", "level", "sink", "main CPU", "process CPU", "wall", "stderr")
    print("{:<6} {:<8} {:<8} {:>13} {:>13} {:>13} {:>8}".format(*head))
    configs = [
        (f, level, sink) for f in args.formats.split(",") for level in LEVELS for sink in SINKS
    ]
    runs: dict[tuple[str, str, str], list[tuple[dict[str, float], int]]] = {c: [] for c in configs}
    for _ in range(args.rounds):  # round-robin, so a noisy moment does not hit one row only
        for c in configs:
            runs[c].append(measure(c[2], c[1], c[0], args))
    for (log_format, level, sink), results in runs.items():
        cells = []
        for key in ("main", "cpu", "wall"):
            values = [r[0][key] for r in results]
            cells.append(f"{min(values):6.1f} /{statistics.median(values):6.1f}")
        size = results[0][1]
        print(f"{log_format:<6} {level:<8} {sink:<8} {' '.join(cells)} {size / 1e6:6.1f}MB")


if __name__ == "__main__":
    main()
