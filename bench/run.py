"""Node BullMQ worker vs our Python worker, same jobs, same Redis, one table: `make bench`.

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--only noop-c3,latency,...]
                                  [--private-redis] [--out bench/results/latest.json]

Each scenario runs every round on both workers (the order alternates between rounds), each
worker in its own process, on a fresh queue `bench-<scenario>-<impl>-<hex>` whose keys are
deleted afterwards (Redis is never flushed). Jobs come from bench/producer.mjs (Node, the web
service's job options). The table shows medians over the rounds; every run's raw figures go to
`--out`, and the table to the same path with `.md`. bench/README.md explains each figure.

Redis: REDIS_PUBLIC_URL / REDIS_URL / REDIS_HOST as for the worker (default
redis://127.0.0.1:6379), or `--private-redis` for a throw-away redis-server on a free port.
`--python` and `--py-loop uvloop` run the Python worker with another interpreter or event loop,
to try the changes proposed in bench/FINDINGS.md before making them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from worker.settings import RedisSettings, redis_settings_from_env  # noqa: E402

NODE = os.environ.get("NODE", "node")
PY_LOG_LEVEL = "WARNING"
READY_TIMEOUT_S = 30.0

FLASHCARDS_PAYLOAD = {
    "content": (
        "Cardiology studies the heart. An electrocardiogram records its rhythm; arrhythmia is an "
        "irregular rhythm. Pathology studies disease through biopsy and histology. Radiology "
        "uses X-rays, ultrasound and magnetic resonance imaging."
    ),
    "subject": "Medicine",
    "topic": "Cardiology",
    "userId": "5f0c1e9a-3b7d-4c2e-9a61-0d8b2f4e7c13",
    "nativeLanguage": "Spanish",
    "targetLanguage": "English",
}


# --- processes -------------------------------------------------------------------------------


class Proc:
    """A child process speaking JSON lines on stdout; its stderr goes to a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self._stderr = log.open("w")
        self.p = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_json(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line on stdout; other lines (e.g. a tool's banner) are skipped."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"{Path(self.argv[1]).name}: no answer in {timeout_s:.0f} s; {self.tail()}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"{Path(self.argv[1]).name} exited ({self.p.wait()}) without answering; "
                    f"{self.tail()}"
                )
            if line.strip().startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed

    def tail(self) -> str:
        self._stderr.flush()
        lines = self.log.read_text(errors="replace").strip().splitlines()[-8:]
        return "stderr: " + (" | ".join(lines) if lines else "(empty)")

    def terminate(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self._stderr.close()


@dataclasses.dataclass
class Env:
    redis_url: str
    client: redis.Redis
    logs: Path
    python: str = sys.executable
    py_loop: str = "auto"
    openai_url: str = ""

    def worker(
        self,
        impl: str,
        q: str,
        *,
        concurrency: int,
        processor: str = "noop",
        expect: int = 0,
        limiter: str = "",
        rss_at: str = "",
        keep_starts: bool = True,
        log_level: str = PY_LOG_LEVEL,
        bare: bool = False,
    ) -> Proc:
        argv = ["--queue", q, "--redis", self.redis_url, "--concurrency", str(concurrency)]
        argv += ["--expect", str(expect)]
        if limiter:
            argv += ["--limiter", limiter]
        if rss_at:
            argv += ["--rss-at", rss_at]
        if self.openai_url:
            argv += ["--openai-url", self.openai_url]
        if not keep_starts:
            argv += ["--no-starts"]
        if impl == "node":
            argv = [NODE, str(BENCH / "node_worker.mjs"), *argv, "--processor", processor]
        else:
            argv = [self.python, str(BENCH / "py_worker.py"), *argv, "--log-level", log_level]
            argv += ["--loop", self.py_loop] + (["--bare"] if bare else [])
        return Proc(argv, self.logs / f"{q}-{uuid.uuid4().hex[:4]}.log")

    def produce(self, mode: str, q: str, name: str, count: int, **kw: str) -> dict[str, Any]:
        argv = [NODE, str(BENCH / "producer.mjs"), mode, "--queue", q, "--redis", self.redis_url]
        argv += ["--name", name, "--count", str(count)]
        for key, value in kw.items():
            argv += [f"--{key.replace('_', '-')}", value]
        proc = Proc(argv, self.logs / f"{q}-producer.log")
        try:
            return proc.next_json(timeout_s=120)
        finally:
            proc.close()

    def drop(self, q: str) -> None:
        """Delete this queue's keys, and only those."""
        keys = list(self.client.scan_iter(match=f"bull:{q}:*", count=1000))
        for i in range(0, len(keys), 500):
            self.client.delete(*keys[i : i + 500])
        self.client.delete(f"bull:{q}")

    def backlog(self, q: str) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(f"bull:{q}:wait")
        pipe.llen(f"bull:{q}:active")
        pipe.zcard(f"bull:{q}:prioritized")
        pipe.zcard(f"bull:{q}:delayed")
        return sum(int(n) for n in pipe.execute())


@contextlib.contextmanager
def fresh_queue(env: Env, scenario: str, impl: str) -> Iterator[str]:
    q = f"bench-{scenario}-{impl}-{uuid.uuid4().hex[:8]}"
    try:
        yield q
    finally:
        env.drop(q)


def finish(proc: Proc, timeout_s: float) -> dict[str, Any]:
    try:
        return proc.next_json(timeout_s)
    finally:
        proc.close()


# --- measurements ----------------------------------------------------------------------------


def throughput(
    env: Env,
    impl: str,
    scenario: str,
    *,
    name: str,
    count: int,
    concurrency: int,
    processor: str,
    rss_at: str = "",
    data: dict[str, Any] | None = None,
    log_level: str = PY_LOG_LEVEL,
    bare: bool = False,
) -> dict[str, Any]:
    """`count` jobs pre-enqueued, then one worker: jobs / (first processor start → last finish)."""
    with fresh_queue(env, scenario, impl) as q:
        env.produce("bulk", q, name, count, data=json.dumps(data or {}))
        proc = env.worker(
            impl, q, concurrency=concurrency, processor=processor, expect=count, rss_at=rss_at,
            keep_starts=False, log_level=log_level, bare=bare,
        )  # fmt: skip
        try:
            proc.next_json(READY_TIMEOUT_S)
        except BaseException:
            proc.close()
            raise
        r = finish(proc, timeout_s=max(120, count * 0.05))
    span_s = (r["lastEnd"] - r["firstStart"]) / 1000
    out = {
        "jobs": r["finished"],
        "failed": r["failed"],
        "span_s": span_s,
        "jobs_per_s": r["finished"] / span_s,
        "jobs_per_min": r["finished"] / span_s * 60,
        "cpu_ms_per_job": r["cpuMsSinceFirstStart"] / r["finished"],
        "vmhwm_mb": r["vmHwmKb"] / 1024,
        "vmrss_mb": r["vmRssKb"] / 1024,
    }
    if r["rssCheckpointsKb"]:
        out["rss_checkpoints_mb"] = {k: v / 1024 for k, v in r["rssCheckpointsKb"].items()}
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency(env: Env, impl: str, *, count: int, interval_ms: int) -> dict[str, Any]:
    """An idle worker (c=3); jobs added one at a time: processor start - just before queue.add."""
    with fresh_queue(env, "latency", impl) as q:
        proc = env.worker(impl, q, concurrency=3, expect=count)
        try:
            proc.next_json(READY_TIMEOUT_S)
            time.sleep(1.0)  # idle: blocked on the marker, as between real jobs
            sent = env.produce("trickle", q, "bench-noop", count, interval_ms=str(interval_ms))
        except BaseException:
            proc.close()
            raise
        r = finish(proc, timeout_s=60)
    started = dict(r["starts"])
    samples = [started[job_id] - t for job_id, t in sent["sent"] if job_id in started]
    return {
        "jobs": len(samples),
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
        "mean_ms": statistics.fmean(samples),
        "vmhwm_mb": r["vmHwmKb"] / 1024,
        "latencies_ms": [round(s, 3) for s in samples],
    }


def max_in_window(times_ms: list[float], window_ms: float) -> int:
    """The most times within any window [t, t + window_ms) (times sorted)."""
    best, i = 0, 0
    for j, t in enumerate(times_ms):
        while t - times_ms[i] >= window_ms:
            i += 1
        best = max(best, j - i + 1)
    return best


def limiter(env: Env, impl: str, *, count: int) -> dict[str, Any]:
    """Limiter 10 per 1000 ms, a backlog of `count`, two worker processes of concurrency 3."""
    with fresh_queue(env, "limiter", impl) as q:
        env.produce("bulk", q, "bench-noop", count)
        procs = [env.worker(impl, q, concurrency=3, limiter="10/1000") for _ in range(2)]
        try:
            for proc in procs:
                proc.next_json(READY_TIMEOUT_S)
            deadline = time.monotonic() + count / 10 * 3 + 30
            while env.backlog(q) and time.monotonic() < deadline:
                time.sleep(0.1)
            for proc in procs:
                proc.terminate()
            results = [proc.next_json(timeout_s=30) for proc in procs]
        finally:
            for proc in procs:
                proc.close()
    starts = sorted(t for r in results for _, t in r["starts"])
    t0 = starts[0]
    span_s = (starts[-1] - t0) / 1000
    whole_s = max(1, int(span_s))
    per_second = [0] * (int(span_s) + 1)
    for t in starts:
        per_second[int((t - t0) // 1000)] += 1
    return {
        "jobs": len(starts),
        "split": [len(r["starts"]) for r in results],
        # Jobs started within the whole seconds after the first start, per second: the steady
        # rate, free of n/span's edge effect (a full window of 10 at each end of the run).
        "sustained_per_s": sum(per_second[:whole_s]) / whole_s,
        "n_over_span_per_s": len(starts) / span_s if span_s else None,
        "max_in_1s": max_in_window(starts, 1000.0),
        "per_second_from_first_start": per_second,
        "start_offsets_ms": [round(t - t0, 2) for t in starts],
        "vmhwm_mb": max(r["vmHwmKb"] for r in results) / 1024,
    }


@contextlib.contextmanager
def openai_standin(env: Env) -> Iterator[None]:
    argv = [sys.executable, str(BENCH / "openai_standin.py"), "--delay-s", "1.0"]
    proc = Proc(argv, env.logs / "openai-standin.log")
    try:
        env.openai_url = proc.next_json(READY_TIMEOUT_S)["base_url"]
        yield
    finally:
        env.openai_url = ""
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.p.wait(timeout=5)
        proc.close()


# --- scenarios -------------------------------------------------------------------------------

Runner = Callable[[Env, str], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    run: Runner
    impls: tuple[str, ...] = ("node", "python")
    needs_openai: bool = False


def _tp(key: str, **kw: Any) -> Runner:
    return lambda env, impl: throughput(env, impl, key, **kw)


NOOP = {"name": "bench-noop", "processor": "noop"}
SLEEP = {"name": "bench-sleep", "processor": "sleep"}
FLASHCARDS = {"name": "generate-flashcards", "processor": "openai", "data": FLASHCARDS_PAYLOAD}
FLASHCARDS_JOBS = 60

SCENARIOS = (
    Scenario("noop-c3", _tp("noop-c3", count=2000, concurrency=3, **NOOP)),
    Scenario("noop-c50", _tp("noop-c50", count=2000, concurrency=50, **NOOP)),
    Scenario("sleep-c3", _tp("sleep-c3", count=300, concurrency=3, **SLEEP)),
    Scenario("sleep-c50", _tp("sleep-c50", count=2000, concurrency=50, **SLEEP)),
    Scenario("latency", lambda env, impl: latency(env, impl, count=200, interval_ms=20)),
    Scenario("limiter", lambda env, impl: limiter(env, impl, count=100)),
    Scenario("memory", _tp("memory", count=10_000, concurrency=3, rss_at="1000,10000", **NOOP)),
    Scenario(
        "flashcards",
        _tp("flashcards", count=FLASHCARDS_JOBS, concurrency=3, **FLASHCARDS),
        needs_openai=True,
    ),
    # What the processors' SDKs weigh: the same worker with only the bench processors.
    Scenario(
        "memory-bare", _tp("memory-bare", count=2000, concurrency=3, bare=True, **NOOP), ("python",)
    ),
    # What per-job logging costs: the production log level (INFO), log lines to a file.
    Scenario(
        "noop-c3-info",
        _tp("noop-c3-info", count=2000, concurrency=3, log_level="INFO", **NOOP),
        ("python",),
    ),
)

Raw = dict[str, dict[str, list[dict[str, Any]]]]


def run_all(env: Env, scenarios: list[Scenario], rounds: int) -> Raw:
    raw: Raw = {}
    for sc in scenarios:
        raw[sc.key] = {impl: [] for impl in sc.impls}
        with openai_standin(env) if sc.needs_openai else contextlib.nullcontext():
            for rnd in range(rounds):
                order = sc.impls if rnd % 2 == 0 else tuple(reversed(sc.impls))
                for impl in order:
                    t, load = time.monotonic(), os.getloadavg()[0]
                    try:
                        figures = sc.run(env, impl)
                    except Exception as exc:  # one broken run must not lose the others
                        figures = {"error": f"{type(exc).__name__}: {exc}"}
                    figures.update(round=rnd + 1, wall_s=time.monotonic() - t, loadavg_1m=load)
                    raw[sc.key][impl].append(figures)
                    print(
                        f"  {sc.key:<13} {impl:<6} #{rnd + 1}: {_brief(figures)}", file=sys.stderr
                    )
    return raw


def _brief(figures: dict[str, Any]) -> str:
    keys = ("error", "jobs_per_s", "p50_ms", "p99_ms", "sustained_per_s", "max_in_1s", "vmhwm_mb")
    return ", ".join(f"{k} {_fmt(figures[k])}" for k in keys if k in figures)


# --- table -----------------------------------------------------------------------------------


def median_of(raw: Raw, key: str, impl: str, path: str) -> float | None:
    values = []
    for run in raw.get(key, {}).get(impl, []):
        value: Any = run
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.median(values) if values else None


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


@dataclasses.dataclass
class Row:
    scenario: str
    metric: str
    node: float | None
    python: float | None
    ideal: float | None = None
    target: str = ""
    ok: bool | None = None  # None: no target, or not measured
    digits: int = 1

    def cells(self) -> list[str]:
        ratio = self.python / self.node if self.python is not None and self.node else None
        vs_ideal = self.python / self.ideal if self.python is not None and self.ideal else None
        verdict = {True: "met", False: "**missed**", None: ""}[self.ok]
        return [
            self.scenario, self.metric, _fmt(self.node, self.digits),
            _fmt(self.python, self.digits), _fmt(ratio, 2), _fmt(self.ideal, 0),
            _fmt(vs_ideal, 3), self.target, verdict,
        ]  # fmt: skip


def _cmp(ok: Callable[[float, float], bool], a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else ok(a, b)


def build_rows(raw: Raw) -> list[Row]:
    def m(key: str, impl: str, path: str) -> float | None:
        return median_of(raw, key, impl, path)

    def pair(key: str, path: str) -> tuple[float | None, float | None]:
        return m(key, "node", path), m(key, "python", path)

    def ge(a: float | None, b: float | None) -> bool | None:
        return _cmp(lambda x, y: x >= y, a, b)

    def le(a: float | None, b: float | None) -> bool | None:
        return _cmp(lambda x, y: x <= y, a, b)

    rows: list[Row] = []
    for key, label in (("noop-c3", "no-op ×2000, c=3"), ("noop-c50", "no-op ×2000, c=50")):
        n, p = pair(key, "jobs_per_s")
        rows.append(Row(label, "jobs/s", n, p, target="≥ 1.0× Node", ok=ge(p, n), digits=0))
    n, p = pair("noop-c3", "cpu_ms_per_job")
    rows.append(Row("no-op ×2000, c=3 (same runs)", "worker CPU ms/job", n, p, digits=3))
    # The memory runs are 5x longer: Node's JIT is warm for most of them (bench/FINDINGS.md).
    label = "no-op ×10,000, c=3 (the peak-RSS runs)"
    n, p = pair("memory", "jobs_per_s")
    rows.append(Row(label, "jobs/s", n, p, target="report", digits=0))
    n, p = pair("memory", "cpu_ms_per_job")
    rows.append(Row(label, "worker CPU ms/job", n, p, digits=3))
    for key, label, ideal in (
        ("sleep-c3", "sleep 50 ms ×300, c=3", 3 / 0.050),
        ("sleep-c50", "sleep 50 ms ×2000, c=50", 50 / 0.050),
    ):
        n, p = pair(key, "jobs_per_s")
        rows.append(Row(label, "jobs/s", n, p, ideal, "≥ 0.98× ideal", ge(p, 0.98 * ideal)))
    for pct in ("p50", "p99"):
        n, p = pair("latency", f"{pct}_ms")
        label = "pickup latency, idle worker, 200 added 1 by 1"
        rows.append(Row(label, f"{pct} ms", n, p, target="≤ Node", ok=le(p, n), digits=2))
    label = "limiter 10/s, 2 processes, backlog 100"
    n, p = pair("limiter", "sustained_per_s")
    ok = None if p is None else 9.5 <= p <= 10.5
    rows.append(Row(label, "sustained jobs/s", n, p, 10, "9.5 – 10.5", ok, 2))
    n, p = pair("limiter", "n_over_span_per_s")
    rows.append(Row(label, "n / (last − first start)", n, p, digits=2))
    n, p = pair("limiter", "max_in_1s")
    rows.append(Row(label, "most started in a sliding 1 s", n, p, target="report", digits=0))
    n, p = pair("memory", "vmhwm_mb")
    rows.append(
        Row("peak RSS (VmHWM), no-op ×10,000, c=3", "MB", n, p, target="≤ 0.5× Node",
            ok=_cmp(lambda x, y: x <= 0.5 * y, p, n))
    )  # fmt: skip
    growth: dict[str, float | None] = {}
    for impl in ("node", "python"):
        a = m("memory", impl, "rss_checkpoints_mb.1000")
        b = m("memory", impl, "rss_checkpoints_mb.10000")
        growth[impl] = None if a is None or b is None else (b / a - 1) * 100
    p = growth["python"]
    rows.append(
        Row("RSS after 10,000 vs after 1,000 jobs (same runs)", "growth %", growth["node"], p,
            target="< 10 %", ok=None if p is None else p < 10)
    )  # fmt: skip
    peaks: dict[str, float | None] = {}
    for impl in ("node", "python"):
        hwm = [r["vmhwm_mb"] for rs in raw.values() for r in rs.get(impl, []) if "vmhwm_mb" in r]
        peaks[impl] = max(hwm, default=None)
    rows.append(Row("peak RSS, highest of all runs", "MB", peaks["node"], peaks["python"]))
    bare = m("memory-bare", "python", "vmhwm_mb")
    rows.append(
        Row("peak RSS, Python without processor SDKs (openai, postgrest)", "MB", None, bare)
    )
    n, p = pair("flashcards", "jobs_per_min")
    label = f"generate-flashcards ×{FLASHCARDS_JOBS}, OpenAI stand-in 1 s, c=3"
    rows.append(Row(label, "jobs/min", n, p, 180, "≥ 0.97× ideal", ge(p, 0.97 * 180)))
    n, p = m("noop-c3", "node", "jobs_per_s"), m("noop-c3-info", "python", "jobs_per_s")
    rows.append(Row("no-op ×2000, c=3, Python at LOG_LEVEL=INFO", "jobs/s", n, p, digits=0))
    return [r for r in rows if r.node is not None or r.python is not None]


HEADER = ["Scenario", "Metric", "Node", "Python", "Py/Node", "Ideal", "Py/ideal", "Target", ""]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def url_of(s: RedisSettings) -> str:
    auth = ""
    if s.username or s.password:
        auth = f"{quote(s.username or '', safe='')}:{quote(s.password or '', safe='')}@"
    return f"{'rediss' if s.tls else 'redis'}://{auth}{s.host}:{s.port}/{s.db}"


def versions(client: redis.Redis, python: str) -> dict[str, str]:
    def node_pkg(name: str) -> str:
        path = BENCH / "node_modules" / name / "package.json"
        return str(json.loads(path.read_text())["version"]) if path.exists() else "missing"

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()

    probe = (
        "import importlib.metadata as m, importlib.util as u, platform\n"
        "v = lambda n: m.version(n) if u.find_spec(n) else '-'\n"
        "print(platform.python_version(), v('bullmq'), v('redis'), v('uvloop'), v('hiredis'))"
    )
    py, bullmq, redis_py, uvloop, hiredis = run(python, "-c", probe).split()
    return {
        "node": run(NODE, "--version"),
        "bullmq_node": node_pkg("bullmq"),
        "ioredis": node_pkg("ioredis"),
        "python": py,
        "bullmq_python": bullmq,
        "redis_py": redis_py,
        "uvloop": uvloop,
        "hiredis": hiredis,
        "redis_server": str(client.info("server")["redis_version"]),
        "git": run("git", "-C", str(ROOT), "describe", "--always", "--dirty"),
        "cpus": str(os.cpu_count()),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def header_line(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    loop = meta["py_loop"]
    if loop == "auto":
        loop = "uvloop" if v["uvloop"] != "-" else "asyncio"
    hiredis = f"hiredis {v['hiredis']}" if v["hiredis"] != "-" else "no hiredis"
    return (
        f"{meta['started']} · worker code {v['git']} · {v['cpus']} CPUs · "
        f"Redis {v['redis_server']} · "
        f"Node {v['node']}, bullmq {v['bullmq_node']} · Python {v['python']}, "
        f"bullmq {v['bullmq_python']}, redis-py {v['redis_py']} ({hiredis}), {loop} loop, "
        f"our worker at LOG_LEVEL {PY_LOG_LEVEL} unless the row says otherwise · "
        f"median of {meta['rounds']} round(s) · {meta['wall_s']:.0f} s"
    )


def slim(raw: Raw) -> Raw:
    """Per-job lists only where they are the point (latency, limiter), so the JSON stays small."""

    def keep(key: str, value: Any) -> bool:
        return not isinstance(value, list) or key in ("latency", "limiter")

    return {
        key: {
            impl: [{k: v for k, v in run.items() if keep(key, v)} for run in runs]
            for impl, runs in by_impl.items()
        }
        for key, by_impl in raw.items()
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round per scenario")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated scenario keys")
    parser.add_argument("--private-redis", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "latest.json")
    parser.add_argument("--python", default=sys.executable, help="interpreter for py_worker.py")
    parser.add_argument("--py-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    wanted = {k for k in args.only.split(",") if k}
    if unknown := wanted - {s.key for s in SCENARIOS}:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    scenarios = [s for s in SCENARIOS if not wanted or s.key in wanted]
    if not (BENCH / "node_modules" / "bullmq").exists():
        print("bench/node_modules is missing: npm ci --prefix bench", file=sys.stderr)
        return 2

    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    with contextlib.ExitStack() as stack:
        if args.private_redis:
            from tests.support.redis_server import private_redis

            redis_url = stack.enter_context(private_redis())
        else:
            redis_url = url_of(redis_settings_from_env(os.environ))
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        stack.callback(client.close)
        env = Env(redis_url, client, logs, python=args.python, py_loop=args.py_loop)
        meta: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M %Z"),
            "rounds": rounds,
            "python_log_level": PY_LOG_LEVEL,
            "py_loop": args.py_loop,
            "python_executable": args.python,
            "versions": versions(client, args.python),
            "loadavg_before": os.getloadavg(),
        }
        keys = ", ".join(s.key for s in scenarios)
        print(f"bench: {rounds} round(s) of {keys}", file=sys.stderr)
        t0 = time.monotonic()
        raw = run_all(env, scenarios, rounds)
        meta["wall_s"] = round(time.monotonic() - t0, 1)
        meta["loadavg_after"] = os.getloadavg()

    rows = build_rows(raw)
    text = f"{header_line(meta)}\n\n{table(rows)}"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "table": [dataclasses.asdict(r) for r in rows], "runs": slim(raw)}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nraw runs: {args.out}", file=sys.stderr)
    errors = [r for by_impl in raw.values() for rs in by_impl.values() for r in rs if "error" in r]
    if errors:
        print(f"{len(errors)} run(s) failed; worker logs kept in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
