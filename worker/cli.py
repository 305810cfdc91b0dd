"""Operator commands beside the service: run, check, enqueue, stats."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from loguru import logger

from worker.capacity import WINDOWS_MIN, MinuteCounts, capacity_report, parse_minutes
from worker.contract import Contract
from worker.errors import ConfigError, JobError, ProviderMissing, UnknownJobType
from worker.health import iso_now
from worker.idempotency import idempotency_key
from worker.keys import bull_key
from worker.logs import secrets_from_env, setup_logging
from worker.protocol import QueueClient, cluster_client
from worker.redis_probe import (
    RedisUnreachable,
    bounded_client,
    cluster_in_use,
    describe,
    eviction_problem,
    probe,
    server_identity,
    server_info,
)
from worker.results import node_json
from worker.settings import Settings, unread_variables

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

T = TypeVar("T")

# The web service's default job options (INTEROP §1).
DEFAULT_JOB_OPTS: dict[str, Any] = {
    "attempts": 3,
    "backoff": {"type": "exponential", "delay": 2000},
    "removeOnComplete": {"age": 3600, "count": 100},
    "removeOnFail": {"age": 86400, "count": 500},
}
# The web service keys only flashcards (contract/README.md: a lesson key would ignore
# targetLanguage and sourceFileName).
IDEMPOTENT_JOB_TYPES = ("generate-flashcards",)
# INTEROP §2: the web service's /api/queue/stats shows these, in this order, and a `total` that
# sums all eight states of getJobCounts().
STATS_SHOWN = ("waiting", "active", "completed", "failed", "delayed")
STATS_STATES = (*STATS_SHOWN, "paused", "prioritized", "waiting-children")


def job_id_for(name: str) -> str:
    """`<name>-<Date.now()>-<4 to 6 base-36 chars>`, as the web service makes them."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    suffix = "".join(random.choice(alphabet) for _ in range(random.randint(4, 6)))
    return f"{name}-{int(time.time() * 1000)}-{suffix}"


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the worker service (the default)")
    # Commands beside the service: each Redis step gives up after this long, saying why.
    bounded = argparse.ArgumentParser(add_help=False)
    # A queue of one's choice, where WORKER_QUEUES names several (or none of them).
    one_queue = argparse.ArgumentParser(add_help=False)
    one_queue.add_argument(
        "--queue",
        metavar="NAME",
        help="this queue (default: enqueue: the first of WORKER_QUEUES; stats: each of them)",
    )
    bounded.add_argument(
        "--redis-timeout",
        type=_seconds,
        metavar="S",
        help="seconds each Redis step may take before the command gives up "
        "(default: WORKER_CLI_TIMEOUT_S, else 5)",
    )
    sub.add_parser(
        "check",
        parents=[bounded],
        help="check settings, Redis and processors; exit 0 when fit to run",
    )
    enqueue = sub.add_parser(
        "enqueue", parents=[bounded, one_queue], help="add a job the way the web service does"
    )
    enqueue.add_argument("name", help="job type, e.g. ping")
    enqueue.add_argument("--data", default="{}", help="the payload as JSON")
    enqueue.add_argument("--priority", type=int, help="BullMQ priority: 1 runs first, 0 = none")
    enqueue.add_argument(
        "--wait", action="store_true", help="wait for the final state and print it"
    )
    enqueue.add_argument("--timeout", type=float, default=300.0, help="seconds to --wait (300)")
    enqueue.add_argument("--no-validate", action="store_true", help="skip the contract check")
    stats_parser = sub.add_parser(
        "stats",
        parents=[bounded, one_queue],
        help="print the web service's /api/queue/stats answer",
    )
    stats_parser.add_argument(
        "--all",
        action="store_true",
        help="then a line: every state's count, and the backlog (waiting + prioritized)",
    )
    stats_parser.add_argument(
        "--capacity",
        action="store_true",
        help="then a line: jobs finished per minute (last 5 and 60 min, BullMQ's metrics), the"
        " backlog, minutes to drain it, and workers needed to drain it within --drain-within",
    )
    stats_parser.add_argument(
        "--drain-within",
        default="10m",
        type=_duration,
        help="target for --capacity: 10m, 90s, 1h (default 10m)",
    )
    return parser


def main(argv: list[str], env: Mapping[str, str]) -> int:
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        for problem in exc.each:
            print(f"Configuration error: {problem}", file=sys.stderr)
        return 2
    secrets = secrets_from_env(env, [settings.redis.password])
    setup_logging(settings.log_format, settings.log_level, secrets)
    if command == "run":
        return run_service(settings, env)
    timeout_s = args.redis_timeout or settings.cli_timeout_s
    if command == "check":
        return asyncio.run(check(settings, env, timeout_s))
    queues = [args.queue] if getattr(args, "queue", None) else [q.name for q in settings.consumed]
    if command == "enqueue":
        return _with_redis(enqueue(settings.for_queue_named(queues[0]), args, timeout_s))
    if command == "stats":
        capacity = args.drain_within if args.capacity else None
        for queue in queues:  # one answer per queue, each as the web service's route gives it
            of_queue = settings.for_queue_named(queue)
            code = _with_redis(stats(of_queue, timeout_s, args.all, capacity))
            if code:
                return code
        return 0
    raise AssertionError(command)


def _with_redis(command: Coroutine[Any, Any, int]) -> int:
    """Run a command that needs Redis; when Redis fails it, say why and exit 1 (2 for settings
    the service would refuse on this server, such as a cluster and a prefix without a tag)."""
    try:
        return asyncio.run(command)
    except RedisUnreachable as exc:
        print(f"Redis not usable: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        for problem in exc.each:
            print(f"Configuration error: {problem}", file=sys.stderr)
        return 2


def run_service(settings: Settings, env: Mapping[str, str]) -> int:
    from processors import build_registry
    from worker.service import Service

    for warning in unread_variables(env):
        logger.warning(warning)
    try:
        registry = build_registry(env, settings.job_types)
        contract = Contract.load()
        _check_contract_coverage(registry.names(), contract)
    except ConfigError as exc:
        for problem in exc.each:
            logger.error("Cannot start: {}", problem)
        if settings.job_types is None:  # every type, by default: a fresh clone lands here
            logger.info(
                "To try the worker without credentials, run only the ping job type on a queue "
                "of your own: WORKER_JOB_TYPES=ping WORKER_QUEUE=dev-<you> make run"
            )
        return 2
    except ValueError as exc:
        logger.error("Cannot start: {}", exc)
        return 2
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(Service(settings, registry, contract).run())


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (every Linux install from the lock file): the event loop and its
    sockets in C, about a third less CPU per job (bench/FINDINGS.md); asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _check_contract_coverage(names: list[str], contract: Contract) -> None:
    missing = [name for name in names if not contract.has(name)]
    if missing:
        raise ValueError(f"no contract schema for job types: {', '.join(missing)}")


async def check(settings: Settings, env: Mapping[str, str], timeout_s: float) -> int:
    """Print what the service would run with; exit 1 if anything would stop it."""
    from processors import build_each

    ok = True

    def line(status: str, text: str) -> None:
        print(f"[{status:>4}] {text}")

    s = settings
    queues = f"queue {s.queue}, prefix {s.prefix}, concurrency {s.concurrency}, limiter "
    queues += s.limiter_text
    if len(s.consumed) > 1:
        each = [
            f"{q.name} (concurrency {q.concurrency}, limiter {s.for_queue(q).limiter_text})"
            for q in s.consumed
        ]
        queues = f"queues {', '.join(each)}, prefix {s.prefix}"
    line("ok", f"settings: {queues}, health port {s.health_port}, grace {s.shutdown_grace_s:g} s")
    for warning in unread_variables(env):
        line("warn", warning)
    status, text = await _health_port(s)
    ok = ok and status != "FAIL"
    line(status, text)
    line("ok", f"redis: {s.redis.redacted_url} (from {s.redis.source})")
    if s.redis.tls:
        line("warn" if s.redis.tls_insecure else "ok", f"redis connection: {s.redis.tls_mode}")
    try:
        info = await probe(s.redis, timeout_s)
        line("ok", f"redis answers: {server_identity(info)}")
        if problem := eviction_problem(info):
            line("FAIL", problem)
            ok = False
        if cluster_in_use(s, info):
            line("ok", f"redis cluster: {await _cluster_reach(s, timeout_s)}")
    except RedisUnreachable as exc:
        line("FAIL", f"redis unreachable: {exc}")
        ok = False
    except ConfigError as exc:  # what the service would refuse at start-up on this server
        for error in exc.each:
            line("FAIL", str(error))
        ok = False
    try:
        built = build_each(env, s.job_types)
    except ValueError as exc:
        line("FAIL", f"processors: {exc}")
        built, ok = [], False
    contract = Contract.load()
    for name, spec in built:
        if isinstance(spec, ProviderMissing):  # optional: its jobs fail with this sentence
            line("off", f"processor {name}: {spec.sentence}")
            continue
        if isinstance(spec, ConfigError):  # every problem, each on its line
            for error in spec.each:
                line("FAIL", f"processor {name}: {error}")
            ok = False
            continue
        covered = contract.has(spec.name)
        ok = ok and covered
        line(
            "ok" if covered else "FAIL",
            f"processor {spec.name}: {spec.description}"
            + ("" if covered else " (no contract schema)"),
        )
        for note in spec.notes:
            line("warn", f"{spec.name}: {note}")
        if spec.aclose is not None:
            await spec.aclose()
    print("fit to run" if ok else "NOT fit to run")
    return 0 if ok else 1


async def _health_port(s: Settings) -> tuple[str, str]:
    """Can the service bind its health port? Inside a running service (`railway ssh … check`)
    the port is the service's own: that is fine, and said."""
    from worker.health import listening_socket

    try:
        listening_socket(s.health_port).close()
    except OSError as exc:
        pid = await _worker_on(s.health_port)
        if pid is not None:
            return "ok", f"health port {s.health_port}: held by a running worker (pid {pid})"
        return "FAIL", str(s.health_port_error(exc))
    return "ok", f"health port {s.health_port} can be bound"


async def _worker_on(port: int) -> int | None:
    """The pid of the worker whose /health answers on `port`, if one does."""
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if isinstance(body, dict) and body.get("service") == "worker":
        pid = body.get("pid")
        return pid if isinstance(pid, int) else None
    return None


async def enqueue(settings: Settings, args: argparse.Namespace, timeout_s: float) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"--data is not JSON: {exc}", file=sys.stderr)
        return 2
    if not args.no_validate:
        try:
            Contract.load().validate_payload(args.name, data)
        except UnknownJobType as exc:  # before JobError, of which it is one
            print(f"{exc} (use --no-validate to send it anyway)", file=sys.stderr)
            return 2
        except JobError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    opts: dict[str, Any] = {**DEFAULT_JOB_OPTS, "jobId": job_id_for(args.name)}
    if args.priority is not None:
        opts["priority"] = args.priority
    async with _Queue(settings, timeout_s) as queue:
        if args.name in IDEMPOTENT_JOB_TYPES and isinstance(data, dict):
            key = idempotency_key(args.name, data)
            cached = await queue.step(queue.client.redis.get(key))
            if cached:
                print(node_json({"status": "cached", **json.loads(cached)}))
                return 0
            opts["idempotencyKey"] = key
        job_id = await queue.step(queue.client.add(args.name, data, opts))
        print(node_json({"jobId": job_id, "name": args.name, "status": "added"}))
        if not args.wait:
            return 0
        return await _wait_for(queue, job_id, args.timeout)


async def _cluster_reach(s: Settings, timeout_s: float) -> str:
    """Reach a cluster as the service does at start-up: the cluster client's slot table from
    the node in the URL, then the node owning the queue's slot (its blocking wait's)."""
    client = cluster_client(s, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    marker = bull_key(s.prefix, s.queue, "marker")
    try:
        async with asyncio.timeout(timeout_s):
            await client.initialize()
            owner = client.get_node_from_key(marker)
            if owner is None:
                raise RedisUnreachable(
                    f"no node of the cluster serves the slot of {marker}", "other"
                )
            await client.ping(target_nodes=owner)
        masters = len(client.get_primaries())
        return f"{masters} masters; queue {s.queue} on {owner.host}:{owner.port}"
    except RedisUnreachable:
        raise
    except Exception as exc:
        raise RedisUnreachable(*describe(exc, s.redis, timeout_s)) from exc
    finally:
        await client.aclose()


class _Queue:
    """The CLI's queue client: INFO first (the cause at once when Redis cannot be used), then
    every step bounded by `timeout_s`; a failed step raises RedisUnreachable saying why. On a
    Redis Cluster (REDIS_CLUSTER=true, or INFO `cluster_enabled:1`, as the service decides) the
    steps go through the cluster client, made as the service makes it."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._redis: Redis = bounded_client(settings.redis, timeout_s)
        self.client = QueueClient(settings, self._redis)

    async def __aenter__(self) -> _Queue:
        try:
            info = await server_info(self._redis, self.settings.redis, self.timeout_s)
            if problem := eviction_problem(info):
                logger.warning(problem)
            if cluster_in_use(self.settings, info):
                await self.close()
                timeout_s = self.timeout_s
                self._redis = cast("Redis", cluster_client(
                    self.settings, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
                ))  # fmt: skip
                self.client = QueueClient(self.settings, self._redis)
                await self.step(cast("RedisCluster", self._redis).initialize())
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.close()
        except Exception as exc:  # closing is best effort: the answer is already out
            logger.debug("closing the Redis connection: {}", exc)

    async def step(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call
        except Exception as exc:
            raise RedisUnreachable(*describe(exc, self.settings.redis, self.timeout_s)) from exc


async def _wait_for(queue: _Queue, job_id: str, timeout_s: float) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        state = await queue.step(queue.client.state(job_id))
        if state in ("completed", "failed", "unknown"):
            out: dict[str, Any] = {"jobId": job_id, "status": state}
            fields = await queue.step(queue.client.job_fields(job_id))
            out.update(fields or {})
            print(node_json(out))
            return 0 if state == "completed" else 1
        await asyncio.sleep(0.2)
    print(node_json({"jobId": job_id, "status": "timeout"}))
    return 1


async def stats(
    settings: Settings,
    timeout_s: float,
    every_state: bool = False,
    drain_within_min: float | None = None,
) -> int:
    async with _Queue(settings, timeout_s) as queue:
        counts = await queue.step(queue.client.counts(*STATS_STATES))
        print(node_json(web_stats(settings.queue, counts)))
        backlog = counts["waiting"] + counts["prioritized"]
        if every_state:  # what the web service's answer hides: BullMQ 5 keeps priority jobs apart
            print(node_json({"counts": {s: counts[s] for s in STATS_STATES}, "backlog": backlog}))
        if drain_within_min is not None:
            points = max(WINDOWS_MIN)
            done = await queue.step(queue.client.minute_counts("completed", points))
            failed = await queue.step(queue.client.minute_counts("failed", points))
            workers = await queue.step(queue.client.worker_count())
            report = capacity_report(
                MinuteCounts.from_redis(*done), MinuteCounts.from_redis(*failed), backlog,
                workers, drain_within_min,
            )  # fmt: skip
            print(node_json({"capacity": report}))
        return 0


def _duration(text: str) -> float:
    try:
        return parse_minutes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def web_stats(queue: str, counts: Mapping[str, int]) -> dict[str, Any]:
    """What the web service's /api/queue/stats answers for these counts (INTEROP §2)."""
    shown: dict[str, Any] = {"queue": queue, **{state: counts[state] for state in STATS_SHOWN}}
    shown["total"] = sum(counts[state] for state in STATS_STATES)
    return {"success": True, "stats": shown, "timestamp": iso_now()}
