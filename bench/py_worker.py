"""Our worker in the benchmark: the real `worker.service.Service`, bench processors added.

    python bench/py_worker.py --queue Q --concurrency 3 [--sleep-ms 50] [--limiter 10/1000]
        [--expect N] [--rss-at 1000,10000] [--openai-url URL] [--log-level WARNING] [--no-starts]
        [--loop auto|asyncio|uvloop] [--bare]

Everything a production job goes through runs here: the JobLoop (worker/loop.py) and its
protocol, the Dispatcher (routing, contract checks where a schema exists, JSON-safe results),
stats, logging context, the health server and the graceful stop. Every production processor
module is imported (the deployed memory footprint) and registered where it builds without
Supabase credentials (ping, generate-flashcards with budget checks off), plus `bench-noop` and
`bench-sleep`; jobs are routed by name as in production. The start of each job is recorded where
the processor's handler begins. The event loop is the one `python -m worker` picks (`--loop
auto`: uvloop when installed).

stdout: the same protocol as bench/node_worker.mjs (a ready line, then one line of measurements
when `--expect` jobs have finished, or on SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.cli import event_loop_factory  # noqa: E402
from worker.context import JobContext  # noqa: E402
from worker.contract import Contract  # noqa: E402
from worker.logs import setup_logging  # noqa: E402
from worker.registry import Handler, ProcessorSpec, Registry  # noqa: E402
from worker.service import Service  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.stats import Stats  # noqa: E402

FLASHCARDS = "generate-flashcards"


def cpu_ms() -> float:
    """User + system CPU time of this process so far."""
    t = os.times()
    return (t.user + t.system) * 1000


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in kB."""
    out = {"vmRssKb": 0, "vmHwmKb": 0}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["vmRssKb"] = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            out["vmHwmKb"] = int(line.split()[1])
    return out


class Recorder:
    def __init__(self, expect: int, rss_at: set[int], keep_starts: bool) -> None:
        self.expect = expect
        self.keep_starts = keep_starts
        self.rss_at = rss_at
        self.starts: list[tuple[str, float]] = []
        self.ends: list[tuple[str, float]] = []
        self.rss_checkpoints: dict[str, int] = {}
        self.finished = 0
        self.failed = 0
        self.first_start: float | None = None
        self.cpu_at_first_start = 0.0
        self.last_end: float | None = None
        self.done = asyncio.Event()

    def started(self, job_id: str) -> None:
        t = time.time() * 1000
        if self.first_start is None:
            self.first_start = t
            self.cpu_at_first_start = cpu_ms()
        if self.keep_starts:
            self.starts.append((job_id, t))

    def wrap(self, handler: Handler) -> Handler:
        async def timed(payload: dict[str, Any], ctx: JobContext) -> Any:
            self.started(ctx.job_id)
            result = handler(payload, ctx)
            return await result if asyncio.iscoroutine(result) else result

        return timed

    def ended(self, job_id: str | None = None) -> None:
        self.finished += 1
        self.last_end = time.time() * 1000
        if self.keep_starts:
            self.ends.append((job_id or "", self.last_end))
        if self.finished in self.rss_at:
            self.rss_checkpoints[str(self.finished)] = proc_status()["vmRssKb"]
        if self.expect and self.finished >= self.expect:
            self.done.set()

    def on_failed(self, outcome: str) -> None:
        self.failed += 1
        print(f"py_worker: a job attempt ended as {outcome!r}", file=sys.stderr)
        self.ended()


class RecordingStats(Stats):
    """The service's counters, also telling the recorder when a job's outcome is stored
    (after moveToFinished, as Node's `completed`/`failed` events fire)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def job_ended(self, outcome: str, duration_s: float) -> None:
        super().job_ended(outcome, duration_s)
        if outcome == "completed":
            self.recorder.ended()
        else:
            self.recorder.on_failed(outcome)


def bench_registry(args: argparse.Namespace, recorder: Recorder) -> Registry:
    from worker.errors import ConfigError

    async def noop(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        return {"ok": True}

    sleep_s = args.sleep_ms / 1000

    async def sleep(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        await asyncio.sleep(sleep_s)
        return {"ok": True}

    env = {
        "OPENAI_API_KEY": "sk-bench",
        # Only the flashcards scenario calls it; elsewhere nothing listens there.
        "OPENAI_BASE_URL": args.openai_url or "http://127.0.0.1:9/v1",
    }
    registry = Registry()
    # Every production processor module is imported (the deployed footprint); those that need
    # credentials the benchmark does not have (Supabase) are left out of the registry.
    # --bare leaves them all out, to show what their SDKs (openai, postgrest) weigh.
    modules: tuple[str, ...] = () if args.bare else importlib.import_module("processors").MODULES
    for module_name in modules:
        module = importlib.import_module(f"processors.{module_name}")
        try:
            spec = module.build(env)
        except ConfigError:
            continue
        if spec.name == FLASHCARDS:
            spec = dataclasses.replace(spec, handler=recorder.wrap(spec.handler))
        registry.register(spec)
    registry.register(ProcessorSpec("bench-noop", recorder.wrap(noop)))
    registry.register(ProcessorSpec("bench-sleep", recorder.wrap(sleep)))
    return registry


async def main(args: argparse.Namespace) -> None:
    setup_logging("text", args.log_level)
    env = {
        "REDIS_URL": args.redis,
        "WORKER_QUEUE": args.queue,
        "WORKER_PREFIX": args.prefix,
        "WORKER_CONCURRENCY": str(args.concurrency),
        "WORKER_HEALTH_PORT": "0",
        "LOG_LEVEL": args.log_level,
        "WORKER_LIMITER_MAX": "0",
    }
    if args.limiter:
        limit_max, duration_ms = args.limiter.split("/")
        env["WORKER_LIMITER_MAX"] = limit_max
        env["WORKER_LIMITER_DURATION_MS"] = duration_ms
    settings = Settings.from_env(env)
    rss_at = {int(n) for n in args.rss_at.split(",") if n}
    recorder = Recorder(args.expect, rss_at, keep_starts=not args.no_starts)
    service = Service(settings, bench_registry(args, recorder), Contract.load())
    service.stats = RecordingStats(recorder)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, recorder.done.set)
    await service.start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)

    await recorder.done.wait()
    status = proc_status()  # before stop: the working set of a running worker
    cpu = cpu_ms() - recorder.cpu_at_first_start
    await service.stop()
    result = {
        "impl": "python",
        "pid": os.getpid(),
        "finished": recorder.finished,
        "failed": recorder.failed,
        "firstStart": recorder.first_start,
        "lastEnd": recorder.last_end,
        "starts": recorder.starts,
        "ends": recorder.ends,
        "rssCheckpointsKb": recorder.rss_checkpoints,
        "cpuMsSinceFirstStart": cpu,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        **status,
    }
    print(json.dumps(result), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", required=True)
    p.add_argument("--prefix", default="bull")
    p.add_argument("--redis", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--sleep-ms", type=float, default=50)
    p.add_argument("--limiter", default="")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--rss-at", default="")
    p.add_argument("--openai-url", default="")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--no-starts", action="store_true", help="keep no per-job start times")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    p.add_argument("--bare", action="store_true", help="no production processors, bench ones only")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "auto":  # what `python -m worker` uses
        factory = event_loop_factory()
    elif args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args))


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
