"""What the per-job log lines cost the event loop: the old synchronous sink against worker.logs.

    python bench/log_cost.py [--jobs 20000] [--rounds 3] [--formats text,json]

Each measurement runs in a fresh child process set up as `python -m worker` sets up logging
(`setup_logging(format, level, secrets)`, stderr) with its stderr a pipe that this process reads
and throws away, as a log collector would. The child makes, per job, the calls
worker/dispatch.py makes: `logger.contextualize(job_id, job_name, attempt)` around "Job picked
up", "Currently processing" and the lazy "Processing job | ... | Started: <ISO time>" line, then
the bound, lazy "Job completed" line of the completion listener.

Sinks: `sync` is the sink worker/logs.py had before the queued one (redact, write, flush, on the
caller's thread), copied here so it can still be measured; `current` is whatever
worker/logs.py now installs. Per job it prints the time the logging calls held the calling
thread (`loop`: what the event loop loses), the time until every line had reached the pipe
(`+drain`) and the process CPU time, the writer thread's included (`cpu`). The median of the
rounds is shown.
"""

from __future__ import annotations

import argparse
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


def setup_sync_sink(log_format: str, level: str) -> None:
    """worker/logs.py's setup_logging before the queued sink (f4fff20), unchanged in effect."""
    from loguru import logger

    from worker.logs import Redactor, _text_format

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

    for i in range(min(2000, args.jobs)):  # warm-up: caches, the writer thread, the pipe
        one_job(i)
    flush()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(args.jobs):
        one_job(i)
    t1 = time.perf_counter()
    flush()
    t2, cpu1 = time.perf_counter(), time.process_time()
    n = args.jobs
    figures = {"loop": (t1 - t0) / n * 1e6, "drain": (t2 - t0) / n * 1e6}
    figures["cpu"] = (cpu1 - cpu0) / n * 1e6
    print(json.dumps(figures), flush=True)


def measure(sink: str, level: str, log_format: str, jobs: int) -> tuple[dict[str, float], int]:
    """One child; returns its figures and how many bytes it wrote to stderr."""
    cmd = [sys.executable, __file__, "--child", "--sink", sink, "--level", level]
    cmd += ["--format", log_format, "--jobs", str(jobs)]
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--formats", default="text,json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sink", choices=SINKS, default="current", help=argparse.SUPPRESS)
    p.add_argument("--level", default="INFO", help=argparse.SUPPRESS)
    p.add_argument("--format", default="text", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.jobs} jobs x 4 log calls, median of {args.rounds} rounds, µs per job")
    head = ("format", "level", "sink", "loop", "+drain", "cpu", "stderr")
    print("{:<6} {:<8} {:<8} {:>7} {:>7} {:>7} {:>9}".format(*head))
    for log_format in args.formats.split(","):
        for level in LEVELS:
            for sink in SINKS:
                runs = [measure(sink, level, log_format, args.jobs) for _ in range(args.rounds)]
                med = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
                size = runs[0][1]
                print(
                    f"{log_format:<6} {level:<8} {sink:<8} {med['loop']:7.1f} {med['drain']:7.1f}"
                    f" {med['cpu']:7.1f} {size / 1e6:7.1f}MB"
                )


if __name__ == "__main__":
    main()
