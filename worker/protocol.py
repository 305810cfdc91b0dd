"""The BullMQ protocol, and the only module that imports `bullmq`: its Lua scripts (by file
name), its key layout, the job hash and lock tokens. The run loop (worker/loop.py) speaks to
Redis through `QueueProtocol` only; `tests/test_protocol.py` pins every script name, key count
and argument position used here against the pinned bullmq, so an upgrade fails there by name.

Why not `bullmq.Worker`: the project had re-implemented most of its loop around it (fetch-next,
the limiter wait, a command pool, requeue, drain) through overrides and patches of its
internals (shared/research/review.md §2). Here the scripts are called directly, with the
arguments Node's worker passes, so what Redis sees is what a Node worker would write.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgpack
from bullmq import Queue
from bullmq.job import optsDecodeMap
from bullmq.queue_keys import QueueKeys
from bullmq.redis_connection import loadScript
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, BusyLoadingError, MovedError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import jsondecode
from worker.autopipeline import AutoPipelinedScript
from worker.joblog import JobLog
from worker.keys import bull_key
from worker.results import node_json, well_formed
from worker.settings import Settings

BULLMQ_VERSION = "3.4.4"  # the pinned package whose Lua scripts these are (pyproject.toml)

# Script name -> file in bullmq/commands; the number is the script's KEYS count.
SCRIPTS = {
    "moveToActive": "moveToActive-11.lua",
    "moveToFinished": "moveToFinished-14.lua",
    "moveToDelayed": "moveToDelayed-11.lua",
    "retryJob": "retryJob-11.lua",
    "moveJobFromActiveToWait": "moveJobFromActiveToWait-9.lua",
    "extendLocks": "extendLocks-1.lua",
    "moveStalledJobsToWait": "moveStalledJobsToWait-9.lua",
    "updateProgress": "updateProgress-3.lua",
}

# Node's `job.log(line)`: RPUSH to `<job key>:logs`, then LTRIM to the last `keepLogs` lines,
# only while the job exists (a line for a removed job would leave its log behind for good).
_PUSH_LOGS = """
if {lines} and redis.call("EXISTS", {job}) == 1 then
  local n = redis.call("RPUSH", {logs}, unpack(ARGV, {first}))
  local keep = tonumber({keep})
  if keep and keep > 0 and n > keep then redis.call("LTRIM", {logs}, -keep, -1) end
end
"""
# Alone: KEYS job, logs; ARGV keepLogs, lines...
PUSH_LOGS = (
    _PUSH_LOGS.format(lines="ARGV[2]", job="KEYS[1]", logs="KEYS[2]", first=2, keep="ARGV[1]")
    + "return 0"
)
# Ahead of moveToFinished, unchanged below it: its 14 KEYS and 9 ARGV, then KEYS[15] logs,
# ARGV[10] keepLogs, ARGV[11...] lines. The attempt's lines then cost no command (and no reply)
# of their own on the hot path; pushed first, so a job removed on completion takes them along.
FINISH_WITH_LOGS_PRELUDE = "-- the attempt's job.log lines (ai-jobs worker)" + _PUSH_LOGS.format(
    lines="ARGV[11]", job="KEYS[12]", logs="KEYS[15]", first=11, keep="ARGV[10]"
)

# Sockets for the worker's non-blocking commands (the blocking wait has its own). More made
# the c=50 sleep benchmark slower: 50 slots ending together then hit Redis as one burst.
COMMAND_CONNECTIONS = 4
# Sent data unacknowledged this long: the command connection is dead (TCP_USER_TIMEOUT).
COMMAND_SOCKET_DEAD_S = 30
MAX_SAFE_INTEGER = 2**53 - 1
# Replies (besides READONLY and LOADING, which redis-py gives classes of their own) of a server
# that is no longer, or not yet, the writable primary: after a failover the address may lead
# elsewhere once connections are made again (`reset_connections`).
FAILOVER_REPLIES = ("MASTERDOWN", "UNBLOCKED")
# At most one reset of every connection this often, however many slots meet the error.
RESET_EVERY_S = 1.0


def is_failover(exc: BaseException) -> bool:
    """A ReadOnlyError, LOADING, MASTERDOWN, or a blocked call cut by a role change."""
    if isinstance(exc, ReadOnlyError | BusyLoadingError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(FAILOVER_REPLIES)


def command_socket_options() -> dict[str, Any]:
    """Socket settings of the command pool: a dead connection is cut by the kernel, not by a
    timer per command.

    redis-py enforces `socket_timeout` with an `asyncio.wait_for` (a new Task) around every
    send and a timeout context around every read: 9 % of the worker's CPU per job
    (bench/FINDINGS.md). Node's ioredis sets no command timeout either. What the timer guarded
    against, a peer that vanished without a reset, is bounded here by TCP: keepalive probes
    after 10 s idle (5 s apart, 3 of them) and TCP_USER_TIMEOUT, which drops a connection whose
    sent data stays unacknowledged for 30 s. A Redis that accepts data but never answers is
    caught by /ready's own 2 s probe.
    """
    options: dict[int, int] = {}
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", COMMAND_SOCKET_DEAD_S * 1000),
    ):
        constant = getattr(socket, name, None)  # Linux has all four; others fewer
        if constant is not None:
            options[constant] = value
    return {"socket_timeout": None, "socket_keepalive": True, "socket_keepalive_options": options}


def _redis_kwargs(settings: Settings, pool: bool = False) -> dict[str, Any]:
    """bullmq's connection policy (retry with backoff on connection errors), and invalid UTF-8
    kept as surrogates instead of an exception that would lose the whole reply. `pool`: for a
    connection pool, whose connection class carries TLS (settings.RedisSettings.pool_kwargs)."""
    redis = settings.redis
    return {
        **(redis.pool_kwargs() if pool else redis.connection_kwargs()),
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "retry": Retry(ExponentialBackoff(cap=20, base=1), 20),
        "retry_on_error": [BusyLoadingError, RedisConnectionError, RedisTimeoutError],
    }


def cluster_client(settings: Settings, **overrides: Any) -> RedisCluster:
    """redis-py's cluster client as the service makes it (the connection class, TLS and
    credentials of settings.redis, seeded with the node in the URL); `overrides` bound the
    CLI's in time. It follows MOVED, ASK and TRYAGAIN itself."""
    kwargs = {**_redis_kwargs(settings), **command_socket_options()}
    kwargs.pop("db", None)
    kwargs.pop("retry_on_error", None)
    # Redirections (MOVED, ASK, TRYAGAIN while a slot migrates) are retried by the client
    # itself; this retry is for connection errors: a node that went away.
    kwargs["retry"] = Retry(ExponentialBackoff(cap=2, base=0.1), 6)
    return RedisCluster(**{**kwargs, **overrides})


# --- the job hash -----------------------------------------------------------------------------


@dataclass(slots=True)
class ActiveJob:
    """A job this worker holds the lock of, decoded from its hash (`bull:<queue>:<id>`)."""

    id: str
    name: str
    data: Any
    opts: dict[str, Any]
    token: str
    attempts_made: int = 0  # finished attempts before this one (`atm`)
    timestamp: int = 0
    stacktrace: str = "[]"  # JSON list as stored; read only when an attempt fails
    deferred_failure: str | None = None  # `defa`: BullMQ asks the worker to fail it at once

    @property
    def max_attempts(self) -> int:
        attempts = self.opts.get("attempts")
        return attempts if isinstance(attempts, int) and attempts > 0 else 1

    @property
    def attempt(self) -> int:
        """1-based number of the attempt that is starting."""
        return self.attempts_made + 1


@dataclass(slots=True)
class UndecodableJob:
    """A job activated by us whose hash cannot be read: it is failed at once, never retried."""

    id: str
    token: str
    reason: str
    attempts_made: int = 0


def _text(raw: Mapping[str, str], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept as surrogates by the client
        raise ValueError(f"{name} is not UTF-8") from None
    return value


def _json_field(raw: Mapping[str, str], name: str, default: str) -> Any:
    text = _text(raw, name)
    try:
        return jsondecode.loads(default if text is None else text)
    except ValueError as exc:
        raise ValueError(f"{name} is not JSON ({exc})") from None


def _int_field(raw: Mapping[str, str], *names: str) -> int:
    for name in names:
        text = _text(raw, name)
        if text is None or text == "":
            continue
        try:
            return int(text)
        except ValueError:
            pass
        try:  # Node's parseInt also reads "12.0" and "1e3"
            number = float(text)
        except ValueError:
            raise ValueError(f"{name} is not a number: {text[:40]!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{name} is not a number: {text[:40]!r}")
        return int(number)
    return 0


# moveToActive writes processedOn and ats into the job's hash even when the hash is gone, so a
# hash without name and data is a job whose data vanished (before: "Unknown job type: None").
MISSING_DATA = (
    "Job data is missing: its hash was gone from Redis when the worker took it (evicted under "
    "a maxmemory-policy other than noeviction, or deleted)"
)


def decode_job(raw: Mapping[str, str], job_id: str, token: str) -> ActiveJob | UndecodableJob:
    """The job hash as Node's `Job.fromJSON` reads the fields a worker needs."""
    if "name" not in raw and "data" not in raw:
        return UndecodableJob(job_id, token, MISSING_DATA)
    try:
        attempts_made = _int_field(raw, "atm", "attemptsMade")
    except ValueError:
        attempts_made = 0
    try:
        data = _json_field(raw, "data", "{}")
        opts = _json_field(raw, "opts", "{}")
        if not isinstance(opts, dict):
            raise ValueError(f"opts is a JSON {type(opts).__name__}, not an object")
        return ActiveJob(
            id=job_id,
            name=_text(raw, "name") or "",
            data=data,
            opts={optsDecodeMap.get(key, key): value for key, value in opts.items()},
            token=token,
            attempts_made=_int_field(raw, "atm", "attemptsMade"),
            timestamp=_int_field(raw, "timestamp"),
            stacktrace=_text(raw, "stacktrace") or "[]",
            deferred_failure=_text(raw, "defa") or None,
        )
    except (ValueError, RecursionError, MemoryError) as exc:
        reason = exc.args[0] if isinstance(exc, ValueError) and exc.args else repr(exc)
        return UndecodableJob(job_id, token, f"Job data could not be decoded: {reason}",
                              attempts_made)  # fmt: skip


@dataclass(slots=True)
class NextJob:
    """What moveToActive (or a completion with fetch-next) answered."""

    job: ActiveJob | UndecodableJob | None
    limit_until_ms: int = 0  # > 0: the rate limiter says wait this long
    delay_until_ms: int = 0  # > 0: timestamp of the next delayed job


def _next_job(reply: Any, token: str) -> NextJob:
    """`raw2NextJobData` of bullmq: [flat job hash or nil, id, limitUntil, delayUntil]."""
    if not reply:
        return NextJob(None)
    flat, job_id = reply[0], reply[1]
    limit_until = int(reply[2] or 0) if len(reply) > 2 else 0
    delay_until = int(reply[3] or 0) if len(reply) > 3 else 0
    job = None
    if flat:
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        job = decode_job(raw, str(job_id), token)
    return NextJob(job, max(limit_until, 0), max(delay_until, 0))


def keep_jobs(remove: Any) -> dict[str, Any]:
    """`removeOnComplete`/`removeOnFail` as the scripts' keepJobs (bullmq getKeepJobs)."""
    if type(remove) is int:
        return {"count": remove}
    if isinstance(remove, dict):
        return remove
    return {"count": 0} if remove else {"count": -1}


def backoff_delay_ms(opts: Mapping[str, Any], attempts_made: int) -> int:
    """BullMQ's built-in backoffs: `fixed` and `exponential` (2^(n-1) * delay).

    Raises ValueError for a strategy only a custom Node backoffStrategy knows.
    """
    backoff = opts.get("backoff")
    if backoff is None or backoff is False:
        return 0
    if type(backoff) is int:
        backoff = {"type": "fixed", "delay": backoff}
    if not isinstance(backoff, dict):
        raise ValueError(f"unknown backoff {backoff!r}")
    delay = backoff.get("delay") or 0
    kind = backoff.get("type")
    if kind == "fixed":
        return int(delay)
    if kind == "exponential":
        return int(round(pow(2, attempts_made - 1) * delay))  # noqa: RUF046  (delay may be float)
    raise ValueError(f"unknown backoff strategy {kind!r}")


def stack_of(job: ActiveJob, exc: BaseException) -> str:
    """The job's stacktrace list with this attempt's trace appended, JSON, as Node keeps it."""
    try:
        kept = jsondecode.loads(job.stacktrace)
    except ValueError:
        kept = []
    stack = [*(kept if isinstance(kept, list) else []), trace_of(exc)]
    limit = job.opts.get("stackTraceLimit")
    if limit == 0:
        stack = []
    elif isinstance(limit, int) and limit > 0:
        stack = stack[-limit:]
    return json.dumps(stack, separators=(",", ":"))


# One attempt's trace stays under this (Node's are ~300 bytes; a chained Python traceback
# through httpx and openai was ~7 KB, x attempts x 500 kept failed jobs).
TRACE_MAX_CHARS = 2000
TRACE_CAUSES = 5
_OUR_ROOT = str(Path(__file__).resolve().parent.parent) + os.sep
_LIBRARY_MARKERS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _ours(filename: str) -> bool:
    return filename.startswith(_OUR_ROOT) and not any(m in filename for m in _LIBRARY_MARKERS)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def trace_of(exc: BaseException) -> str:
    """One attempt's trace, read top-down as Node's `err.stack` is: the exception on the first
    line, then the project's own frames (innermost first, `at function (path:line)`), a count
    of the library frames left out, and one `Caused by:` line per chained exception."""
    ours: list[str] = []
    libraries: dict[str, None] = {}
    left_out = 0
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _ours(frame.filename):
            ours.append(f"    at {frame.name} ({frame.filename[len(_OUR_ROOT) :]}:{frame.lineno})")
        else:
            left_out += 1
            libraries[_library_of(frame.filename)] = None
    tail = (
        [f"    ... {left_out} library frame(s) left out: {', '.join(libraries)}"]
        if left_out
        else []
    )
    seen = {id(exc)}
    cause = _cause_of(exc)
    while cause is not None and id(cause) not in seen and len(seen) <= TRACE_CAUSES:
        seen.add(id(cause))
        tail.append(f"Caused by: {_one_line(cause)}{_where(cause)}")
        cause = _cause_of(cause)
    head = _one_line(exc, 500)
    cut = 0
    while ours and len("\n".join([head, *ours, *tail])) + 40 > TRACE_MAX_CHARS:
        ours.pop()  # the outermost of ours first: the innermost say where it broke
        cut += 1
    if cut:
        ours.append(f"    ... {cut} more frame(s) of ours")
    return "\n".join([head, *ours, *tail])[:TRACE_MAX_CHARS]


def _where(exc: BaseException) -> str:
    """` (at function path:line)`: the innermost of our frames the exception went through."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _ours(frame.filename):
            return f" (at {frame.name} {frame.filename[len(_OUR_ROOT) :]}:{frame.lineno})"
    return ""


def _cause_of(exc: BaseException) -> BaseException | None:
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__


def _library_of(filename: str) -> str:
    """`httpx` for …/site-packages/httpx/_client.py; `asyncio` for the standard library's."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            after = parts[parts.index(marker) + 1 :]
            return after[0].removesuffix(".py") if after else "?"
    if len(parts) >= 2 and parts[-2].startswith("python3"):
        return parts[-1].removesuffix(".py")
    return parts[-2] if len(parts) >= 2 else filename


def client_name(prefix: str, queue: str, worker_name: str | None = None) -> str:
    """The blocking connection's name, as Node's Worker names it: `<prefix>:<base64(queue)>`,
    plus `:w:<name>` for a named worker. Node bullmq 5.x (`QueueBase.clientName`) and 6.x
    (`RedisQueueBackend.clientName`) build it alike, and their `queue.getWorkers()` lists the
    connections named exactly that or starting with `<that>:w:`."""
    encoded = base64.b64encode(queue.encode()).decode()
    return f"{prefix}:{encoded}" + (f":w:{worker_name}" if worker_name else "")


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _flat(fields: Mapping[str, Any]) -> bytes:
    return _pack([item for pair in fields.items() for item in pair])


def now_ms() -> int:
    return round(time.time() * 1000)


# --- the queue ---------------------------------------------------------------------------------


class _Commands:
    """The command client and the scripts registered on it. One serves every queue a service
    consumes on a single node (`QueueProtocol(share=...)`): the scripts are the same Lua for
    every queue (keys are arguments), so the queues share the pool's sockets and the lanes that
    batch completions, and a replica's connections grow by one blocking connection per queue.
    Closed when the last queue using it closes."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.users = 0
        self.scripts: dict[str, AsyncScript] = {
            name: redis.register_script(loadScript(file)) for name, file in SCRIPTS.items()
        }
        self.push_logs = redis.register_script(PUSH_LOGS)
        # Every completion and failure of every slot runs this script: batch it when busy. One
        # lane less than the pool leaves a socket for lock renewal and the rest. On a cluster the
        # calls go through the cluster client one by one (autopipeline: `direct`).
        finish = FINISH_WITH_LOGS_PRELUDE + loadScript(SCRIPTS["moveToFinished"])
        self.move_to_finished = AutoPipelinedScript(
            redis.register_script(finish), max_in_flight=COMMAND_CONNECTIONS - 1
        )

    async def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            await self.move_to_finished.aclose()
            await self.redis.aclose()


class QueueProtocol:
    """One queue's keys and scripts over a command pool and one blocking connection. `share`:
    another queue's protocol whose command pool and scripts this one uses too (one process
    consuming several queues); on a Redis Cluster each queue keeps a cluster client of its own."""

    def __init__(
        self,
        settings: Settings,
        worker_name: str | None = None,
        share: QueueProtocol | None = None,
    ) -> None:
        self.queue = settings.queue
        self.prefix = settings.prefix
        self.keys: dict[str, str] = QueueKeys(settings.prefix).getKeys(settings.queue)
        self.key_prefix = self.keys[""]  # "bull:ai-jobs:"
        self.lock_duration_ms = settings.lock_duration_ms
        self.limiter = settings.limiter
        # Node's `metrics.maxDataPoints`: the finishing script counts the job per minute.
        self.max_metrics_size: int | str = settings.metrics_max_data_points or ""
        self.worker_name = worker_name
        self.client_name = client_name(settings.prefix, settings.queue, worker_name)
        self._settings = settings
        self.cluster = False
        self._blocking_at: tuple[str, int] | None = None  # cluster: the node of the marker's slot
        kwargs = _redis_kwargs(settings)
        if share is not None and not share.cluster:
            commands = share._commands
        else:
            # Its connection class is the lanes' too (autopipeline: `pool.make_connection()`).
            pool = BlockingConnectionPool(
                max_connections=COMMAND_CONNECTIONS,
                timeout=None,  # wait for a free socket; never fail a command for lack of one
                **{**_redis_kwargs(settings, pool=True), **command_socket_options()},
            )
            commands = _Commands(Redis.from_pool(pool))
        self._use(commands)
        # The blocking wait for jobs gets a connection of its own, with a socket timeout
        # longer than any BZPOPMIN (settings.REDIS_SOCKET_TIMEOUT_S). Named on every connect
        # (redis-py sends CLIENT SETNAME), so a reconnected worker stays listed.
        self.blocking: Redis = Redis(
            single_connection_client=True, client_name=self.client_name, **kwargs
        )
        self._fixed_finished_keys: dict[str, list[bytes]] = {}
        self._marker_b = self.keys["marker"].encode()
        self._prefix_b = self.key_prefix.encode()
        self._reset_at = 0.0
        if settings.redis.cluster:
            self.use_cluster()

    def _use(self, commands: _Commands) -> None:
        self._commands = commands
        commands.users += 1
        self.redis: Redis = commands.redis
        self.scripts = commands.scripts
        self.push_logs = commands.push_logs
        self.move_to_finished = commands.move_to_finished

    def use_cluster(self) -> None:
        """Speak to a Redis Cluster, before `connect`: commands and scripts through redis-py's
        cluster client (which follows MOVED and ASK), the blocking wait on a connection of its
        own to the node that owns the queue's slot (`wait_for_job`). The prefix's hash tag
        (settings.cluster_prefix_problem) puts every key of the queue in that one slot."""
        if self.cluster:
            return
        self.cluster = True
        settings = self._settings
        # The command surface used here (commands, scripts, pipelines) is the same on both.
        # Not yet connected (before `connect`): the single-node client is dropped unused.
        self._commands.users -= 1
        self._use(_Commands(cast("Redis", cluster_client(settings))))
        self.blocking = self._blocking_client(settings.redis.host, settings.redis.port)
        self._blocking_at = None

    def _blocking_client(self, host: str, port: int) -> Redis:
        kwargs = _redis_kwargs(self._settings)
        kwargs.update(host=host, port=port)
        if self.cluster:  # a node that went away: say so soon, the owner is looked up again
            kwargs["retry"] = Retry(ExponentialBackoff(cap=1, base=0.1), 2)
        return Redis(single_connection_client=True, client_name=self.client_name, **kwargs)

    def key(self, *parts: str) -> str:
        return bull_key(self.prefix, self.queue, *parts)

    def _worker_opts(self, token: str) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "token": token,
            "lockDuration": self.lock_duration_ms,
            "limiter": self.limiter,
        }
        if self.worker_name:
            opts["name"] = self.worker_name  # the job's `pb` (processed by), as Node sets it
        return opts

    # -- connection ----------------------------------------------------------------------------

    async def connect(self) -> str:
        """Open the blocking connection (named: what `queue.getWorkers()` lists), check both
        connections answer; returns the server version."""
        if self.cluster:
            await self._cluster_client().initialize()
            await self._blocking_on_owner()
            await self.blocking.ping()
            info = await self.blocking.info("server")
            return str(info.get("redis_version", "?"))
        await self.blocking.ping()
        info = await self.redis.info("server")
        return str(info.get("redis_version", "?"))

    def _cluster_client(self) -> RedisCluster:
        return cast("RedisCluster", self.redis)

    async def _blocking_on_owner(self, at: tuple[str, int] | None = None) -> None:
        """Point the blocking connection at the node owning the marker's slot: `at` (a MOVED
        named it), else the owner in the cluster client's slot table."""
        if at is None:
            node = self._cluster_client().get_node_from_key(self.keys["marker"])
            if node is None:
                raise RedisConnectionError(f"no node owns the slot of {self.keys['marker']}")
            at = (str(node.host), int(node.port))
        if at == self._blocking_at:
            return
        old, self.blocking = self.blocking, self._blocking_client(*at)
        self._blocking_at = at
        await _close_quietly(old)

    async def reset_connections(self) -> bool:
        """Close every connection (pool, lanes, blocking); each is made again on its next use.
        After a failover the same address may now lead to the new primary (a DNS name or a
        proxy in front of it), which connections made before still cannot reach. At most once
        per RESET_EVERY_S; returns whether it reset."""
        now = time.monotonic()
        if now - self._reset_at < RESET_EVERY_S:
            return False
        self._reset_at = now
        await self.move_to_finished.drop_idle()
        if self.cluster:
            await self.redis.aclose()  # the slot table too: read again on the next command
            self._blocking_at = None
        else:
            await self.redis.connection_pool.disconnect()
        if self.blocking.connection is not None:
            await self.blocking.connection.disconnect()
        return True

    async def close(self) -> None:
        await self.blocking.aclose()
        await self._commands.release()  # closed by the last queue that uses it

    # -- fetching ------------------------------------------------------------------------------

    async def wait_for_job(self, timeout_s: float) -> int | None:
        """Block on the marker (BZPOPMIN) until a job may be ready: returns the marker's score
        (0 = a job waits now, else the timestamp of the next delayed job), or None."""
        if self.cluster:
            return await self._wait_on_owner(timeout_s)
        reply = await self.blocking.bzpopmin(self.keys["marker"], max(timeout_s, 0.001))
        if not reply:
            return None
        return int(float(reply[2]))

    async def _wait_on_owner(self, timeout_s: float) -> int | None:
        """The blocking wait on a cluster: on the node that owns the queue's slot. A MOVED (the
        slot migrated; Redis also ends a wait blocked on a slot it gives away) points it at the
        new owner; an ASK (mid-migration) or a lost connection looks the owner up again. None:
        no marker taken, the caller asks moveToActive (through the cluster client) anyway."""
        try:
            await self._blocking_on_owner(self._blocking_at)
            reply = await self.blocking.bzpopmin(self.keys["marker"], max(timeout_s, 0.001))
        except MovedError as exc:
            await self._blocking_on_owner((exc.host, int(exc.port)))
            return None
        except AskError:
            self._blocking_at = None  # the slot is on its way: wait on whoever owns it after
            await asyncio.sleep(0.05)
            return None
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._blocking_at = None
            await _close_quietly(self.blocking)
            raise
        if not reply:
            return None
        return int(float(reply[2]))

    async def move_to_active(self, token: str) -> NextJob:
        keys = [
            self.keys[k]
            for k in ("wait", "active", "prioritized", "events", "stalled", "limiter",
                      "delayed", "paused", "meta", "pc", "marker")
        ]  # fmt: skip
        args = [self.key_prefix, now_ms(), _pack(self._worker_opts(token))]
        return _next_job(await self.scripts["moveToActive"](keys=keys, args=args), token)

    # -- finishing -----------------------------------------------------------------------------

    def _finished_keys(self, target: str, job_id: str) -> list[bytes]:
        """KEYS of moveToFinished-14, as bytes: every job of every slot sends them, and redis-py
        encodes a str argument on each call (about 8 µs of 23 arguments per job)."""
        fixed = self._fixed_finished_keys.get(target)
        if fixed is None:
            names = ("wait", "active", "prioritized", "events", "stalled", "limiter", "delayed",
                     "paused", "meta", "pc", target)  # fmt: skip
            fixed = [self.keys[k].encode() for k in names]
            metrics = self.key("metrics", target).encode()
            self._fixed_finished_keys[target] = fixed = [*fixed, b"", metrics, self._marker_b]
        keys = list(fixed)
        keys[11] = self.key(job_id).encode()
        return keys

    def finished_args(
        self,
        job_id: str,
        token: str,
        target: str,
        value: str,
        opts: Mapping[str, Any],
        attempts_made: int,
        fetch_next: bool,
        fields: Mapping[str, Any] | None = None,
        log: JobLog | None = None,
    ) -> list[Any]:
        """ARGV of moveToFinished-14 (bullmq `Scripts.moveToFinishedArgs`), then the job log's
        keepLogs and lines when there are any (FINISH_WITH_LOGS_PRELUDE)."""
        remove = opts.get("removeOnComplete" if target == "completed" else "removeOnFail", False)
        attempts = opts.get("attempts", 1)
        packed = {
            "token": token,
            "keepJobs": keep_jobs(remove),
            "limiter": self.limiter,
            "lockDuration": self.lock_duration_ms,
            "attempts": attempts,
            "attemptsMade": attempts_made,
            "maxMetricsSize": self.max_metrics_size,
            "fpof": opts.get("failParentOnFailure", False),
            "cpof": opts.get("continueParentOnFailure", False),
            "idof": opts.get("ignoreDependencyOnFailure", False),
            "rdof": opts.get("removeDependencyOnFailure", False),
        }
        if self.worker_name:
            packed["name"] = self.worker_name
        prop = b"returnvalue" if target == "completed" else b"failedReason"
        args: list[Any] = [job_id, now_ms(), prop, value, target.encode(),
                           b"1" if fetch_next else b"", self._prefix_b, _pack(packed)]  # fmt: skip
        if fields:
            args.append(_flat(fields))
        if log is not None and (lines := log.take()):
            if not fields:
                args.append(b"")  # ARGV[9]: no fields to update
            args += [log.keep, *lines]
        return args

    async def _finish(
        self, job_id: str, token: str, target: str, args: list[Any], fetch_next: bool
    ) -> NextJob:
        keys = self._finished_keys(target, job_id)
        if len(args) > 9:  # the job log's lines follow: their key is KEYS[15]
            keys.append(self.key(job_id, "logs").encode())
        reply = await self.move_to_finished(keys=keys, args=args)
        if isinstance(reply, int) and reply < 0:
            raise JobLost(job_id, "moveToFinished", reply)
        return _next_job(reply, token) if fetch_next else NextJob(None)

    async def complete(
        self, job: ActiveJob, result: Any, fetch_next: bool, log: JobLog | None = None
    ) -> NextJob:
        """Completed, with the return value written as Node's JSON.stringify writes it."""
        args = self.finished_args(
            job.id, job.token, "completed", node_json(result), job.opts, job.attempts_made,
            fetch_next, log=log,
        )  # fmt: skip
        return await self._finish(job.id, job.token, "completed", args, fetch_next)

    async def fail(
        self,
        job: ActiveJob | UndecodableJob,
        reason: str,
        stack: str,
        fetch_next: bool,
        log: JobLog | None = None,
    ) -> NextJob:
        """Failed for good (no attempts left, or not retryable)."""
        opts = job.opts if isinstance(job, ActiveJob) else {}
        reason = well_formed(reason)  # as ioredis writes a JS string: lone surrogates as U+FFFD
        fields = {"failedReason": reason, "stacktrace": stack}
        args = self.finished_args(
            job.id, job.token, "failed", reason, opts, job.attempts_made, fetch_next, fields, log
        )
        return await self._finish(job.id, job.token, "failed", args, fetch_next)

    async def retry(
        self, job: ActiveJob, reason: str, stack: str, delay_ms: int, log: JobLog | None = None
    ) -> None:
        """Back to wait (retryJob) or to delayed for the backoff (moveToDelayed), attempt used."""
        fields = {"failedReason": well_formed(reason), "stacktrace": stack}
        name, keys, args = self.retry_call(job, fields, delay_ms)
        reply = await self._after_logs(job.id, log, self.scripts[name], keys, args)
        if isinstance(reply, int) and reply < 0:
            raise JobLost(job.id, name, reply)

    def retry_call(
        self, job: ActiveJob, fields: Mapping[str, Any], delay_ms: int
    ) -> tuple[str, list[str], list[Any]]:
        """Script, KEYS and ARGV of a retry (bullmq `retryJobArgs` / `moveToDelayedArgs`)."""
        if delay_ms > 0:
            args = [self.key_prefix, str(now_ms()), job.id, job.token, delay_ms, "0",
                    _flat(fields), "0"]  # fmt: skip
            return "moveToDelayed", self.delayed_keys(job.id), args
        push = "RPUSH" if job.opts.get("lifo") else "LPUSH"
        args = [self.key_prefix, now_ms(), push, job.id, job.token, _flat(fields)]
        return "retryJob", self.retry_keys(job.id), args

    async def park(self, job: ActiveJob, delay_ms: int, log: JobLog | None = None) -> None:
        """To delayed for `delay_ms` without using an attempt (moveToDelayed, skipAttempt):
        the job waits for a provider (breaker, rate limit, 429), not for a fault of its own.
        Behind every job already waiting, so none starves; its lock released."""
        args = [self.key_prefix, str(now_ms()), job.id, job.token, max(delay_ms, 1), "1", "", "0"]
        script = self.scripts["moveToDelayed"]
        reply = await self._after_logs(job.id, log, script, self.delayed_keys(job.id), args)
        if isinstance(reply, int) and reply < 0:
            raise JobLost(job.id, "moveToDelayed", reply)

    def delayed_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [k["marker"], k["active"], k["prioritized"], k["delayed"], self.key(job_id),
                k["events"], k["meta"], k["stalled"], k["wait"], k["limiter"], k["pc"]]  # fmt: skip

    def retry_keys(self, job_id: str) -> list[str]:
        k = self.keys
        return [k["active"], k["wait"], k["paused"], self.key(job_id), k["meta"], k["events"],
                k["delayed"], k["prioritized"], k["pc"], k["marker"], k["stalled"]]  # fmt: skip

    async def move_to_wait(self, job_id: str, token: str, log: JobLog | None = None) -> int:
        """moveJobFromActiveToWait: lock released, job first in line, attemptsMade kept.
        Returns the script's code (< 0: not ours any more)."""
        k = self.keys
        keys = [k["active"], k["wait"], k["stalled"], k["paused"], k["meta"], k["limiter"],
                k["prioritized"], k["marker"], k["events"]]  # fmt: skip
        script = self.scripts["moveJobFromActiveToWait"]
        reply = await self._after_logs(job_id, log, script, keys, [job_id, token, self.key(job_id)])
        return int(reply)

    async def _after_logs(
        self, job_id: str, log: JobLog | None, script: AsyncScript, keys: list[Any], args: list[Any]
    ) -> Any:
        """`script`, preceded in the same write by the job log's pending lines, if any."""
        lines = log.take() if log is not None else []
        if log is None or not lines:
            return await script(keys=keys, args=args)
        if self.cluster:  # scripts in a cluster pipeline are not reloaded after NOSCRIPT
            log_keys = [self.key(job_id), self.key(job_id, "logs")]
            try:
                await self.push_logs(keys=log_keys, args=[log.keep, *lines])
            except ResponseError:
                pass  # a lost log line is no error
            return await script(keys=keys, args=args)
        async with self.redis.pipeline(transaction=False) as pipe:
            log_keys = [self.key(job_id), self.key(job_id, "logs")]
            await self.push_logs(keys=log_keys, args=[log.keep, *lines], client=pipe)
            await script(keys=keys, args=args, client=pipe)
            _, reply = await pipe.execute(raise_on_error=False)  # a lost log line is no error
        if isinstance(reply, Exception):
            raise reply
        return reply

    # -- locks and stalled jobs ------------------------------------------------------------------

    async def extend_locks(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        """Renew the locks of (job id, token) pairs; returns the ids whose lock was not ours."""
        ids = [job_id for job_id, _ in jobs]
        tokens = [token for _, token in jobs]
        args = [self.key_prefix, _pack(tokens), _pack(ids), self.lock_duration_ms]
        failed = await self.scripts["extendLocks"](keys=[self.keys["stalled"]], args=args)
        return [str(job_id) for job_id in failed or ()]

    async def move_stalled_to_wait(self, max_stalled: int, interval_ms: int) -> list[str]:
        k = self.keys
        keys = [k["stalled"], k["wait"], k["active"], k["stalled-check"], k["meta"],
                k["paused"], k["marker"], k["events"], k["repeat"]]  # fmt: skip
        reply = await self.scripts["moveStalledJobsToWait"](
            keys=keys, args=[max_stalled, self.key_prefix, now_ms(), interval_ms]
        )
        return [str(job_id) for job_id in reply or ()]

    async def locks_of_active(self) -> dict[str, str]:
        """Active job id -> its lock token, for the jobs that still have a lock."""
        ids: list[str] = await self.redis.lrange(self.keys["active"], 0, -1)  # type: ignore[assignment]  # decode_responses: str
        if not ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.get(self.key(job_id, "lock"))
            tokens = await pipe.execute()
        return {job_id: token for job_id, token in zip(ids, tokens, strict=True) if token}

    # -- what the job and the queue may ask ------------------------------------------------------

    async def update_progress(self, job_id: str, progress: Any, log: JobLog | None = None) -> None:
        """Node's `job.updateProgress`; the job log's pending lines go in the same write."""
        keys = [self.key(job_id), self.keys["events"], self.keys["meta"]]
        args = [job_id, node_json(progress)]
        reply = await self._after_logs(job_id, log, self.scripts["updateProgress"], keys, args)
        if isinstance(reply, int) and reply < 0:
            raise JobLost(job_id, "updateProgress", reply)

    async def rate_limit(self, ms: int) -> None:
        """Node's `queue.rateLimit(ms)`: every worker on this queue, Node or Python, waits."""
        await self.redis.set(self.keys["limiter"], MAX_SAFE_INTEGER, px=max(1, ms))

    async def probe(self) -> tuple[int, bool, int]:
        """(waiting + prioritized, paused by an operator, limiter TTL in ms) for /ready."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.keys["wait"])
            pipe.zcard(self.keys["prioritized"])
            pipe.hexists(self.keys["meta"], "paused")
            pipe.pttl(self.keys["limiter"])
            wait, prioritized, paused, limiter_ttl = await pipe.execute()
        return int(wait) + int(prioritized), bool(paused), max(int(limiter_ttl), 0)

    async def snapshot(self) -> tuple[dict[str, int], bool, int]:
        """For /metrics, in one round trip: job counts by state as `queue.getJobCounts()`
        counts them, paused by an operator, limiter TTL in ms."""
        k = self.keys
        lists = ("active", "paused")
        sets = ("completed", "delayed", "failed", "prioritized", "waiting-children")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(k["wait"])
            for name in lists:
                pipe.llen(k[name])
            for name in sets:
                pipe.zcard(k[name])
            pipe.hexists(k["meta"], "paused")
            pipe.pttl(k["limiter"])
            replies = await pipe.execute()
        counts = dict(zip(("waiting", *lists, *sets), (int(n) for n in replies), strict=False))
        return counts, bool(replies[-2]), max(int(replies[-1]), 0)


async def _close_quietly(client: Redis) -> None:
    try:
        await client.aclose()
    except Exception:  # closing a broken connection: nothing left to do
        pass


class JobLost(RuntimeError):
    """A script refused: the job is no longer ours (lock lost, moved by the stalled check)."""

    def __init__(self, job_id: str, command: str, code: int) -> None:
        meaning = {-1: "missing job", -2: "missing lock", -3: "not active", -6: "lock not ours"}
        super().__init__(f"{command} refused for job {job_id}: {meaning.get(code, f'code {code}')}")
        self.code = code


# --- the producer side, for the CLI -----------------------------------------------------------


class QueueClient:
    """bullmq's `Queue`, for `python -m worker enqueue/stats`: add a job, read it back."""

    def __init__(self, settings: Settings, connection: Redis | None = None) -> None:
        """`connection`: a client of the caller's (the CLI passes one bounded in time, with no
        retries); without one, bullmq's, which retries a dead Redis for minutes."""
        # bullmq reports the eviction policy as a raw `warnings` dump on a job's first state
        # read; the CLI says it once, as a log line, from its own INFO (worker/redis_probe.py).
        warnings.filterwarnings("ignore", "IMPORTANT! Eviction policy", UserWarning, "bullmq")
        self._prefix, self._name = settings.prefix, settings.queue
        self._queue = Queue(
            settings.queue,
            {
                "connection": connection or settings.redis.connection_kwargs(),
                "prefix": settings.prefix,
            },
        )

    @property
    def redis(self) -> Any:
        return self._queue.client

    async def add(self, name: str, data: Any, opts: dict[str, Any]) -> str:
        job = await self._queue.add(name, data, opts)
        return str(job.id)

    async def state(self, job_id: str) -> str:
        return str(await self._queue.getJobState(job_id))

    async def job_fields(self, job_id: str) -> dict[str, Any] | None:
        from bullmq import Job

        job = await Job.fromId(self._queue, job_id)
        if job is None:
            return None
        return {
            "progress": job.progress,
            "attemptsMade": job.attemptsMade,
            "result": job.returnvalue,
            "error": job.failedReason or None,
        }

    async def counts(self, *states: str) -> dict[str, int]:
        return dict(await self._queue.getJobCounts(*states))

    async def minute_counts(self, outcome: str, points: int) -> tuple[list[Any], list[Any]]:
        """BullMQ's per-minute metrics of `completed` or `failed`: the hash's (count, prevTS,
        prevCount) and the newest `points` closed minutes."""
        key = bull_key(self._prefix, self._name, "metrics", outcome)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key, "count", "prevTS", "prevCount")
            pipe.lrange(f"{key}:data", 0, points - 1)
            meta, data = await pipe.execute()
        return list(meta), list(data)

    async def worker_count(self) -> int:
        """Workers consuming the queue, Node or Python, as `queue.getWorkers()` counts them."""
        base = client_name(self._prefix, self._name)
        if isinstance(self.redis, RedisCluster):  # each worker waits on the slot's owner
            by_node: Any = await self.redis.client_list(target_nodes=RedisCluster.PRIMARIES)
            lists = by_node.values() if isinstance(by_node, dict) else [by_node]
            clients = [c for listed in lists for c in listed]
        else:
            clients = await self.redis.client_list()
        return sum(
            1
            for c in clients
            if c.get("name") == base or c.get("name", "").startswith(f"{base}:w:")
        )

    async def close(self) -> None:
        await self._queue.close()
