"""`bullmq.Worker` with the traps of the Python package fixed (see shared/research audit).

- redis-py 8's 5 s socket timeout broke the blocking wait: the connection is built here with
  a timeout longer than any BZPOPMIN, and `start` refuses to run when it is not.
- Blocking waits were rounded up to whole seconds because the server version was never read;
  `start` reads it, so delayed jobs run on time.
- The limiter's wait (`limitUntil`) was ignored and the worker slept a whole drainDelay
  (2.2 jobs/s for a 10/s limit): `getNextJob` now sleeps exactly the limiter's TTL.
- Stalled jobs were first checked one interval after start; Node checks at start-up.
- `close()` stopped renewing locks when the first in-flight job ended: shutdown here pauses
  (fetching stops, the run loop and lock renewal go on) and drains before closing.
- Return values were stored with `\\uXXXX` escapes; they are written as Node's JSON.stringify
  writes them (raw UTF-8), byte for byte.

And two costs the package adds per job, measured in bench/FINDINGS.md:
- It completes a job with `fetch_next=False`, then fetches the next in a second round trip; the
  completion here activates the next job as Node's worker does, and the slot runs it at once.
- It forces one locked connection for every command of every slot; commands go over a small
  pool here, so the slots no longer wait for each other's replies, and completions that find
  the pool busy leave together as one pipeline (worker/autopipeline.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from bullmq import Job, Worker
from bullmq.redis_connection import loadScript
from loguru import logger
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from worker.autopipeline import AutoPipelinedScript
from worker.results import node_json
from worker.settings import REDIS_SOCKET_TIMEOUT_S, Settings

# Block no longer than this on the marker; well under the socket timeout.
DRAIN_DELAY_S = 5
MAX_SAFE_INTEGER = 2**53 - 1
# How long shutdown waits for an activation already sent once no job runs.
ACTIVATION_SETTLE_S = 2.0
# Upper bound on closing Redis connections at shutdown.
CLOSE_TIMEOUT_S = 5.0
# Sockets for the worker's non-blocking commands (the blocking wait has its own). More made
# the c=50 sleep benchmark slower: 50 slots ending together then hit Redis as one burst.
COMMAND_CONNECTIONS = 4
# Sent data unacknowledged this long: the command connection is dead (TCP_USER_TIMEOUT).
COMMAND_SOCKET_DEAD_S = 30


def command_socket_options() -> dict[str, Any]:
    """Socket settings of the command pool: a dead connection is cut by the kernel, not by a
    timer per command.

    redis-py enforces `socket_timeout` with an `asyncio.wait_for` (a new Task) around every
    send and a timeout context around every read: 9 % of the worker's CPU per job, the gap
    between 0.9x and 1.0x Node on no-op jobs (bench/FINDINGS.md). Node's ioredis sets no
    command timeout either. What the timer guarded against, a peer that vanished without a
    reset, is bounded here by TCP: keepalive probes after 10 s idle (5 s apart, 3 of them) and
    TCP_USER_TIMEOUT, which drops a connection whose sent data stays unacknowledged for 30 s.
    Either way redis-py then reconnects with bullmq's retry policy. A Redis that accepts data
    but never answers is caught by /ready's own 2 s probe, not here.
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
    return {
        "socket_timeout": None,
        "socket_keepalive": True,
        "socket_keepalive_options": options,
    }


class RedisUnavailable(RuntimeError):
    """Redis did not answer at start-up."""


class QueueWorker(Worker):  # type: ignore[misc]  # bullmq ships no type hints
    _client_name_set: bool  # bullmq's own flag

    def __init__(self, settings: Settings, processor: Any) -> None:
        opts: dict[str, Any] = {
            "connection": settings.redis.connection_kwargs(),
            "prefix": settings.prefix,
            "concurrency": settings.concurrency,
            "lockDuration": settings.lock_duration_ms,
            "stalledInterval": settings.stalled_interval_ms,
            "maxStalledCount": settings.max_stalled_count,
            "drainDelay": DRAIN_DELAY_S,
            "autorun": False,
        }
        if settings.limiter:
            opts["limiter"] = settings.limiter
        if settings.worker_name:
            opts["name"] = settings.worker_name
        super().__init__(settings.queue, processor, opts)
        self._use_connection_pool()
        self._stopping = asyncio.Event()
        # Activations under way: moveToActive calls, and completions that also fetch the next
        # job until that job is handed to its slot (drain waits for both).
        self._activating = 0
        self._fetched_next: dict[str, list[Any]] = {}  # token -> next-job reply of a completion
        self._run_task: asyncio.Task[None] | None = None
        self._move_to_wait = self.redisConnection.conn.register_script(
            loadScript("moveJobFromActiveToWait-9.lua")
        )
        self._write_returnvalue_as_node()
        self._fetch_next_on_complete()

    def _use_connection_pool(self) -> None:
        """Non-blocking commands on a few sockets instead of bullmq's single locked one.

        bullmq forces `single_connection_client=True`: every command of every slot waits for
        the reply to the one before (ioredis in Node pipelines them). The pool keeps the same
        connection settings (retry policy, auth, TLS) but the per-command timeout, see
        `command_socket_options`; the blocking connection stays bullmq's own, with its socket
        timeout. Must run before any script is registered.
        """
        kwargs = dict(self.redisConnection.conn.connection_pool.connection_kwargs)
        kwargs.update(command_socket_options())
        pool = BlockingConnectionPool(
            max_connections=COMMAND_CONNECTIONS,
            timeout=None,  # wait for a free socket; never fail a command for lack of one
            **kwargs,
        )
        pooled = Redis.from_pool(pool)  # closing the client disconnects the pool
        self.redisConnection.conn = pooled
        commands = self.redisConnection.commands
        self.redisConnection.loadCommands()  # scripts are bound to the client they run on
        # Every completion (and failure) of every slot runs this script: batch it when busy.
        # One lane less than the pool leaves a socket for lock renewal and the rest.
        commands["moveToFinished"] = AutoPipelinedScript(
            commands["moveToFinished"], max_in_flight=COMMAND_CONNECTIONS - 1
        )
        self.scripts.redisClient = pooled
        self.client = pooled

    async def _ensure_client_names(self) -> None:
        """Name one connection per worker, as Node's worker does, so that `queue.getWorkers()`
        lists each worker once (bullmq-python names both of its connections; the pool's
        sockets stay unnamed)."""
        if self._client_name_set:
            return
        await self.blockingRedisConnection.set_client_name(self.clientName)
        self._client_name_set = True

    def _write_returnvalue_as_node(self) -> None:
        scripts = self.scripts
        original = scripts.moveToFinishedArgs

        def move_to_finished_args(job: Job, val: Any, prop: str, *args: Any, **kwargs: Any) -> Any:
            if prop != "returnvalue":
                return original(job, val, prop, *args, **kwargs)
            keys, argv = original(job, None, prop, *args, **kwargs)
            argv[3] = node_json(val)  # ARGV[4] of moveToFinished: the encoded value
            return keys, argv

        scripts.moveToFinishedArgs = move_to_finished_args

    def _fetch_next_on_complete(self) -> None:
        """Node's fetch-next: the moveToFinished that completes a job also activates the next
        one, one round trip per job instead of two. Not once stopping, closing or paused."""
        original = self.backend.moveToCompleted

        async def move_to_completed(
            job: Job, value: Any, remove: Any, token: str, fetch_next: bool = False
        ) -> Any:
            if self._stopping.is_set() or self.closing or self.paused:
                return await original(job, value, remove, token, fetch_next=False)
            self._activating += 1  # released by processJob once the job is in its slot
            try:
                out = await original(job, value, remove, token, fetch_next=True)
            except BaseException:
                self._activating -= 1
                raise
            self._fetched_next[token] = out["result"]
            return out

        self.backend.moveToCompleted = move_to_completed

    async def processJob(self, job: Job, token: str) -> None:
        """bullmq's processJob, then the jobs its completions fetched, in this same slot.

        Running the next job here rather than returning it to bullmq's run loop keeps the
        hand-over free of any await between the activation and `self.jobs` (so drain() never
        sees a gap) and spares the run loop's `asyncio.wait` over every slot per job.
        """
        current: Job | None = job
        while current is not None:
            try:
                await super().processJob(current, token)
            except BaseException:
                self._forget_fetched_next(token)
                raise
            current = await self._take_fetched_next(token)

    async def _take_fetched_next(self, token: str) -> Job | None:
        reply = self._fetched_next.pop(token, None)
        if reply is None:
            return None  # the completion fetched nothing (failed, delayed, or stopping)
        try:
            job_data, job_id, limit_until, delay_until = reply
            # Also takes the limiter's wait and the next delayed timestamp from the reply.
            job: Job | None = await self.nextJobFromJobData(
                job_data, job_id, limit_until or 0, delay_until or 0, token
            )
        finally:
            # No await between here and super().processJob adding the job to self.jobs.
            self._activating -= 1
        if job is not None:
            self.emit("active", job, "waiting")
        return job

    def _forget_fetched_next(self, token: str) -> None:
        reply = self._fetched_next.pop(token, None)
        if reply is None:
            return
        self._activating -= 1
        if reply[0]:
            logger.warning(
                "Job {} was activated as its slot stopped; the stalled-job check moves it back",
                reply[1],
            )

    async def start(self, connect_timeout_s: float) -> None:
        """Connect, self-check the connection settings, recover stalled jobs, then run.

        redis-py would retry an unreachable Redis for minutes while /health says "healthy";
        failing after `connect_timeout_s` lets the platform restart us and say why.
        """
        try:
            await asyncio.wait_for(self._connect(), timeout=connect_timeout_s)
        except (TimeoutError, OSError, RedisError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise RedisUnavailable(
                f"Redis not usable at start-up (gave up within {connect_timeout_s:g} s): {detail}"
            ) from exc
        timeout = self.blockingRedisConnection.conn.connection_pool.connection_kwargs.get(
            "socket_timeout"
        )
        if timeout is not None and timeout <= DRAIN_DELAY_S + 5:
            raise RuntimeError(
                f"Redis socket timeout {timeout}s would cut the {DRAIN_DELAY_S}s blocking wait;"
                f" expected None or > {DRAIN_DELAY_S + 5}s (set {REDIS_SOCKET_TIMEOUT_S})"
            )
        self._run_task = asyncio.create_task(self.run(), name="bullmq-run")

    async def _connect(self) -> None:
        for connection in (self.redisConnection, self.blockingRedisConnection):
            await connection.getRedisVersion()  # sets canDoubleTimeout: sub-second waits
        await self.blockingRedisConnection.conn.ping()
        await self.runStalledJobsCheck()

    @property
    def run_task(self) -> asyncio.Task[None] | None:
        return self._run_task

    async def getNextJob(self, token: str) -> Job | None:
        # The limiter answered "wait limitUntil ms": wait exactly that, then ask again,
        # instead of blocking a whole drainDelay on the marker (bullmq PR #3321).
        if self.limitUntil > 0 and not self.closing and not self.paused:
            await self._sleep(self.limitUntil / 1000)
            if self.closing or self.paused:
                return None
            job = await self.moveToActive(token)
            if job:
                self.emit("active", job, "waiting")
            return job
        job = await super().getNextJob(token)
        return job

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def in_flight(self) -> list[tuple[Job, str]]:
        return list(self.jobs)

    async def moveToActive(self, token: str) -> Job | None:
        # The one place a job becomes active. Once shutdown began, take nothing more: a fetch
        # that was past bullmq's pause() check would otherwise activate a job nobody runs.
        if self._stopping.is_set():
            return None
        self._activating += 1
        try:
            return await super().moveToActive(token)
        finally:
            self._activating -= 1

    async def stop_fetching(self) -> None:
        """Stop taking jobs; in-flight jobs go on with their locks renewed."""
        self._stopping.set()
        await self.pause(do_not_wait_active=True)

    async def drain(self, deadline_s: float) -> bool:
        """Wait until no job runs and no activation is under way, or the deadline passes.

        An activation still unanswered after ACTIVATION_SETTLE_S with no job running is stuck
        on an unreachable Redis: it must not hold shutdown for the whole grace period (if
        Redis did activate a job, the stalled-job check returns it).
        """
        end = time.monotonic() + deadline_s
        idle_since: float | None = None
        while self.jobs or self._activating:
            now = time.monotonic()
            if now >= end:
                return not self.jobs
            if self.jobs:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since > ACTIVATION_SETTLE_S:
                break
            await asyncio.sleep(0.05)
        return True

    def _fetched_not_started(self) -> list[tuple[Job, str]]:
        """Jobs a fetch activated as the pause began: the paused run loop will never start them."""
        running = {job.id for job, _ in self.jobs}
        out = []
        for task in self.processing:
            if task.done() and not task.cancelled() and task.exception() is None:
                job = task.result()
                if isinstance(job, Job) and job.id not in running:
                    out.append((job, job.token))
        return out

    async def requeue_in_flight(self) -> list[str]:
        """Put back what never started, cancel what still runs and put it back too, without
        using an attempt (BullMQ's moveJobFromActiveToWait)."""
        pending = self._fetched_not_started() + self.in_flight()
        if self.jobs:
            self.forceClosing = True  # bullmq must not record the cancelled runs as failures
            self.cancelProcessing()
            await asyncio.gather(*self.processing, return_exceptions=True)
        moved = []
        for job, token in pending:
            try:
                code: int | None = await asyncio.wait_for(self.move_to_wait(job, token), 5)
            except Exception as exc:  # reported; stall recovery is the fallback
                logger.warning("Could not return job {} to the queue: {}", job.id, exc)
                code = None
            if code is None or code < 0:
                logger.warning(
                    "Job {} stays active until the stalled-job check moves it back"
                    " (within lock duration + stalled interval)",
                    job.id,
                )
            else:
                moved.append(job.id)
        return moved

    async def move_to_wait(self, job: Job, token: str) -> int:
        """BullMQ's moveJobFromActiveToWait: lock released, job first in line, attemptsMade kept."""
        k = self.keys
        keys = [
            k["active"], k["wait"], k["stalled"], k["paused"], k["meta"],
            k["limiter"], k["prioritized"], k["marker"], k["events"],
        ]  # fmt: skip
        result = await self._move_to_wait(
            keys=keys, args=[job.id, token, self.scripts.toKey(job.id)]
        )
        return int(result)

    async def rate_limit_queue(self, ms: int) -> None:
        """Node's `queue.rateLimit(ms)`: every worker on this queue, Node or Python, waits `ms`."""
        await self.redisConnection.conn.set(self.keys["limiter"], MAX_SAFE_INTEGER, px=max(1, ms))

    async def shutdown(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close connections once no job is in flight (after drain/requeue).

        force=True only cancels leftover fetches (e.g. stuck on an unreachable Redis): every
        job was finished or handed back before this point. bullmq's close() and run loop can
        sit in redis-py's reconnect backoff for minutes when Redis is gone, so both are
        bounded: the process is exiting, and nothing is in flight to lose.
        """
        self._stopping.set()
        closing = asyncio.ensure_future(self.close(force=True))
        tasks: set[asyncio.Future[Any]] = {closing}
        if self._run_task is not None:
            tasks.add(self._run_task)
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        if pending:
            logger.warning("Redis did not answer while closing; leaving its connections behind")
            for task in pending:
                task.cancel()
