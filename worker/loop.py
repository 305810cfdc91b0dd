"""The run loop: one task per concurrency slot, each fetching, running and finishing its job in
a straight line (moveToActive -> processor -> moveToFinished, which also fetches the next job).

One object owns every task it starts: the slots, lock renewal, the stalled-job check and, when
the worker has a stable identity, the heartbeat that lets its successor take back its jobs
after a crash. `stop(grace_s)` is the whole shutdown and keeps a hard deadline of grace + 5 s,
Redis or no Redis. `run_until_idle()` runs the queue empty and returns (tests, one-off runs).

Job outcomes, each recorded once (`_finish_*`): completed; failed for good (not retryable, or
its last attempt; its job type's `on_final_failure` hook is called first); retried (an attempt
used, BullMQ's backoff applied); requeued (a shutdown: back to waiting; or Deferred, e.g. a 429
or an open breaker: parked in delayed; no attempt used).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from redis.exceptions import RedisClusterException, RedisError

from worker.backoff import RedisBackoff
from worker.dispatch import Dispatcher
from worker.errors import Deferred, InvalidPayload, PermanentJobError
from worker.joblog import JobLog
from worker.keys import hash_tag, refused_wait_key, worker_alive_key, worker_runs_key
from worker.logs import job_line, job_lines_on
from worker.metrics import Metrics, QueueMetrics
from worker.protocol import (
    ActiveJob,
    NextJob,
    QueueProtocol,
    UndecodableJob,
    backoff_delay_ms,
    is_failover,
    now_ms,
    stack_of,
)
from worker.redis_probe import (
    RedisUnreachable,
    cluster_in_use,
    server_identity,
    wait_until_reachable,
)
from worker.registry import FinalFailure
from worker.results import node_json
from worker.settings import Settings
from worker.stats import Stats

# Block no longer than this on the marker; well under the blocking socket's timeout.
DRAIN_DELAY_S = 5.0
# After the grace period, what is left of shutdown (hand jobs back, close) gets this long.
STOP_HARD_S = 5.0
# Bounds for an upstream Retry-After: never hammer, never park the queue for ages.
MIN_RATE_LIMIT_S = 1.0
MAX_RATE_LIMIT_S = 300.0
# Parked jobs wake up to this much later than asked, so a crowd parked together comes back
# spread out, and the first to call finds out for the rest.
PARK_JITTER = 0.2
# The per-job total of 429 waits outlives the cap by this much, then expires.
REFUSED_TTL_S = 3600
# A job type's on_final_failure hook gets this long; then the job is marked failed without it.
FINAL_FAILURE_HOOK_S = 30.0
# A worker with a stable identity says it is alive this often, for this long; its successor
# takes back the jobs of a previous run whose heartbeat is gone.
HEARTBEAT_S = 1.0
HEARTBEAT_TTL_MS = 3000
RUNS_TTL_S = 7 * 86_400


UNDECODABLE = "(undecodable)"  # job_type label of jobs whose hash could not be read


class RedisUnavailable(RuntimeError):
    """Redis did not answer at start-up."""


class JobLoop:
    """Consumes one queue with `settings.concurrency` slots."""

    def __init__(
        self,
        settings: Settings,
        protocol: QueueProtocol,
        dispatcher: Dispatcher,
        stats: Stats,
        worker_id: str,
        identity: str | None = None,
        metrics: QueueMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.protocol = protocol
        self.dispatcher = dispatcher
        self.stats = stats
        self.metrics: QueueMetrics = metrics or Metrics(
            settings.queue, lambda: stats.currently_processing
        )
        self.id = worker_id  # lock tokens are `<id>:<n>`
        self.identity = identity  # stable across restarts (RAILWAY_REPLICA_ID / WORKER_NAME)
        self._slots: set[asyncio.Task[None]] = set()
        self._chores: set[asyncio.Task[None]] = set()  # renewal, stalled check, heartbeat
        self._active: dict[str, ActiveJob] = {}  # token -> job held by a slot
        self._requeued: list[str] = []  # ids handed back during shutdown
        self._stopping = False
        self._stopped = asyncio.Event()  # set once stop() is under way: wakes every sleeper
        self._resume = asyncio.Event()
        self._resume.set()
        self._burst = False
        self._drained = False
        self._limit_until = 0.0  # monotonic time the rate limiter lets us fetch again
        self._block_until_ms = 0  # timestamp of the next delayed job, from the scripts
        self._marker_lock = asyncio.Lock()  # one blocking wait per worker, as in Node
        self._marker_wait: asyncio.Future[int | None] | None = None
        self._tokens = 0
        self._poisoned: list[UndecodableJob] = []  # activated, undecodable: to fail at once
        self._stop_task: asyncio.Task[list[str]] | None = None
        self.deadline_hit = False  # stop() had to interrupt running jobs
        # Repeated Redis errors pause the path that met them; `backoff.gave_up` says when the
        # process should exit for the platform to restart it (Service._watch_slots).
        self.backoff = RedisBackoff(settings.redis_give_up_s)
        who = settings.worker_name or dispatcher.identity.get("host", "?")
        self._started_by = f" started (worker {who}, pid {dispatcher.identity.get('pid', '?')})"

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self, connect_timeout_s: float) -> None:
        """Connect, recover stalled jobs (as Node does at start-up), then run the slots.

        redis-py would retry an unreachable Redis for minutes while /health says "healthy";
        failing after `connect_timeout_s` lets the platform restart us and say why. A wrong
        password or TLS failure ends start-up at once; refused, DNS and silence are logged at
        once and tried again until then (redis_probe.wait_until_reachable).
        """
        deadline = time.monotonic() + connect_timeout_s
        try:
            info = await wait_until_reachable(self.settings.redis, connect_timeout_s)
        except RedisUnreachable as exc:
            raise RedisUnavailable(f"Redis not usable at start-up: {exc}") from exc
        logger.info("Redis server: {}", server_identity(info))
        self._use_cluster_if(info)
        try:
            await asyncio.wait_for(self._connect(), timeout=max(deadline - time.monotonic(), 1))
        except (TimeoutError, OSError, RedisError, RedisClusterException) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise RedisUnavailable(
                f"Redis not usable at start-up (gave up within {connect_timeout_s:g} s): {detail}"
            ) from exc
        self._own(self._every(self.settings.lock_duration_ms / 2000, self._renew_locks))
        self._own(self._every(self.settings.stalled_interval_ms / 1000, self._check_stalled))
        if self.identity:
            self._own(self._keep_heartbeat())
        for _ in range(self.settings.concurrency):
            self._spawn_slot()

    def _use_cluster_if(self, info: dict[str, Any]) -> None:
        """A Redis Cluster (INFO `cluster_enabled:1`, or REDIS_CLUSTER=true): the cluster
        client, once the prefix is known to keep the queue in one slot; else ConfigError."""
        s = self.settings
        if not cluster_in_use(s, info):
            return
        self.protocol.use_cluster()
        self.dispatcher.redis = self.protocol.redis
        logger.info(
            "Redis Cluster: queue {} on the slot of hash tag {{{}}}",
            s.queue,
            hash_tag(s.prefix),
        )

    async def _connect(self) -> None:
        await self.protocol.connect()
        await self._check_stalled()

    async def run_until_idle(self, connect_timeout_s: float = 10.0) -> None:
        """Burst mode (arq's `burst`, saq's `process`): run until no job is waiting, then stop."""
        self._burst = True
        await self.start(connect_timeout_s)
        await asyncio.gather(*self._slots)
        await self.stop(0)
        if self.backoff.gave_up:
            raise RedisUnavailable(self.backoff.gave_up)

    @property
    def running(self) -> bool:
        """Slots are alive (false once they all ended, e.g. after a bug killed them)."""
        return any(not task.done() for task in self._slots)

    def pause(self) -> None:
        """Stop fetching (running jobs go on, their locks renewed) until `resume()`."""
        self._resume.clear()
        self._cancel_marker_wait()

    def resume(self) -> None:
        self._resume.set()

    def in_flight(self) -> list[str]:
        return [job.id for job in self._active.values()]

    async def stop(self, grace_s: float, hard: asyncio.Event | None = None) -> list[str]:
        """Stop taking jobs, let running ones finish for up to `grace_s` (or until `hard` is
        set), hand the rest back without using an attempt, close. Never takes longer than
        grace_s + STOP_HARD_S: what Redis cannot take back by then is left to the stalled-job
        check. Returns the ids handed back. Idempotent."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(grace_s, hard))
        return await asyncio.shield(self._stop_task)

    async def _stop(self, grace_s: float, hard: asyncio.Event | None) -> list[str]:
        deadline = time.monotonic() + grace_s + STOP_HARD_S
        self._stopping = True
        self._stopped.set()
        self._resume.set()
        self._cancel_marker_wait()
        slots = {task for task in self._slots if not task.done()}
        if slots and grace_s > 0:
            waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(slots))}
            if hard is not None:
                waiters.add(asyncio.ensure_future(hard.wait()))
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        self.deadline_hit = bool(self._active)
        for task in self._slots:
            task.cancel()  # a slot in its processor hands its job back; one in Redis I/O ends
        if self._slots:
            _, stuck = await asyncio.wait(self._slots, timeout=max(deadline - time.monotonic(), 0))
            for task in stuck:
                logger.warning("A job slot did not stop in time ({}); leaving it", task.get_name())
        left = [job.id for job in self._active.values()]  # in slots that ignored the cancel
        if left:
            logger.warning("Job(s) {} were still running when the worker closed", ", ".join(left))
        for task in self._chores:
            task.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        try:
            await asyncio.wait_for(self._close(), timeout=max(deadline - time.monotonic(), 0.1))
        except (TimeoutError, OSError, RedisError):
            logger.warning("Redis did not answer while closing; leaving its connections behind")
        return list(dict.fromkeys(self._requeued))  # a job may be handed back by two slots

    async def _close(self) -> None:
        if self.identity:  # a clean exit: nothing of ours is left to take back
            p = self.protocol
            await p.redis.delete(worker_alive_key(p.prefix, p.queue, self.id))
            await p.redis.srem(worker_runs_key(p.prefix, p.queue, self.identity), self.id)
        await self.protocol.close()

    # -- the slot ------------------------------------------------------------------------------

    def _spawn_slot(self) -> None:
        task = asyncio.create_task(self._slot(), name=f"slot-{len(self._slots) + 1}")
        self._slots.add(task)

    async def _slot(self) -> None:
        job: ActiveJob | None = None
        while self.backoff.gave_up is None:  # then the service stops, exit code 1
            if job is None:
                if self._stopping:
                    return
                try:
                    job = await self.next_job(self._new_token())
                except Exception as exc:  # Redis unreachable or refusing, or a script error
                    await self._sleep(await self._redis_failed("fetch", exc))
                    continue
                if job is None:
                    if self._stopping or self._burst:
                        return
                    continue
            job_id = job.id
            try:
                job = await self._work(job)
            except Exception as exc:  # a slot never dies of one job
                # The outcome could not be recorded (Redis unreachable, or the lock was lost):
                # the job stays active until the stalled check returns it (counted as a retry).
                logger.warning("Outcome of job {} not recorded: {}", job_id, _reason(exc))
                job = None
                await self._sleep(await self._redis_failed("finish", exc))
            else:
                self.backoff.succeeded("finish")

    async def _redis_failed(self, path: str, exc: Exception) -> float:
        """Note the failure (worker/backoff.py); returns the pause before `path` tries again.
        A server that is no longer the primary: every connection is made again."""
        pause_s = self.backoff.failed(path, exc)
        if is_failover(exc):
            try:
                if await self.protocol.reset_connections():
                    logger.debug("Redis is not a writable primary: every connection made again")
            except (RedisError, OSError) as closing:
                logger.debug("closing connections for a reconnect: {}", closing)
        return pause_s

    def _new_token(self) -> str:
        self._tokens += 1
        return f"{self.id}:{self._tokens}"

    async def next_job(self, token: str) -> ActiveJob | None:
        """The next job to run, or None once stopping (or, in burst mode, when none waits)."""
        while not self._stopping:
            if not self._resume.is_set():
                await self._resume.wait()
                continue
            wait_s = self._limit_until - time.monotonic()
            if wait_s > 0:  # the limiter said how long: wait exactly that (bullmq PR #3321)
                await self._sleep(wait_s)
                continue
            if self._drained:
                if self._burst:
                    return None
                async with self._marker_lock:
                    if self._drained and not self._stopping and self._resume.is_set():
                        await self._wait_for_marker()
                continue
            job = self._take(await self.protocol.move_to_active(token))
            self.backoff.succeeded("fetch")
            await self._fail_poisoned()
            if job is not None:
                return await self._unless_stopping(job)
        return None

    async def _wait_for_marker(self) -> None:
        """Block until a job may be ready (the marker BZPOPMIN), as Node's worker does."""
        timeout_s = DRAIN_DELAY_S
        if self._block_until_ms:
            due_in_s = (self._block_until_ms - now_ms()) / 1000
            if due_in_s <= 0:
                self._drained = False  # a delayed job is due: moveToActive promotes it
                return
            timeout_s = min(due_in_s, DRAIN_DELAY_S)
        self._marker_wait = asyncio.ensure_future(self.protocol.wait_for_job(timeout_s))
        try:
            score = await self._marker_wait
        except asyncio.CancelledError:
            if self._stopping or not self._resume.is_set():
                return  # stop() or pause() cut the wait short
            raise
        finally:
            self._marker_wait = None
        self.backoff.succeeded("fetch")
        if score and score > now_ms():
            self._block_until_ms = score  # only a delayed job, later: wait again until then
        else:
            self._drained = False  # a job waits (or the wait timed out): ask moveToActive

    def _cancel_marker_wait(self) -> None:
        if self._marker_wait is not None and not self._marker_wait.done():
            self._marker_wait.cancel()

    def _take(self, answer: NextJob) -> ActiveJob | None:
        """Note what moveToActive (or a completion fetching the next job) said."""
        self._limit_until = (
            time.monotonic() + answer.limit_until_ms / 1000 if answer.limit_until_ms else 0.0
        )
        if answer.job is not None or answer.limit_until_ms:
            self._drained = False  # jobs wait (when limited: after the limiter's wait, ask again)
        else:
            self._drained = True
            self._block_until_ms = 0
        if answer.delay_until_ms:
            self._block_until_ms = answer.delay_until_ms
        if isinstance(answer.job, UndecodableJob):
            self._poisoned.append(answer.job)
            return None
        return answer.job

    async def _unless_stopping(self, job: ActiveJob) -> ActiveJob | None:
        """A job activated as shutdown began is handed back unstarted, never run."""
        if not self._stopping:
            return job
        await self._hand_back(job)
        return None

    # -- one job -------------------------------------------------------------------------------

    async def _work(self, job: ActiveJob) -> ActiveJob | None:
        """Run one job and record its outcome; returns the next job its completion fetched."""
        token = job.token
        self._active[token] = job
        started = time.monotonic()
        self.stats.job_started()
        self.metrics.job_started(job.name, _waited_s(job))
        outcome = "retry"  # if the outcome cannot be recorded, the stalled check retries it
        recorded = False
        log = self._job_log(job)
        try:
            with logger.contextualize(job_id=job.id, job_name=job.name, attempt=job.attempt):
                self._log_pickup(job)
                try:
                    if job.deferred_failure:
                        raise PermanentJobError(job.deferred_failure)
                    result = await self.dispatcher.run(job, log)
                except asyncio.CancelledError:
                    if not self._stopping:
                        raise
                    _uncancel()
                    outcome = "requeued"
                    logger.warning("Job interrupted by shutdown; it goes back to the queue")
                    _end(log, job, started, "interrupted by shutdown: back to waiting")
                    await self._hand_back(job, log)
                    return None
                except Deferred as exc:
                    outcome, answer = await self._defer(job, exc, log, started)
                except Exception as exc:
                    outcome, answer = await self._fail(job, exc, log, started)
                else:
                    _end(log, job, started, "completed")
                    answer = await self.protocol.complete(job, result, self._fetch_next, log)
                    del self._active[token]
                    recorded = True
                    duration_s = time.monotonic() - started
                    self.stats.job_ended("completed", duration_s)
                    self.metrics.job_ended(job.name, "completed", duration_s)
                    self._log_completed(job, result, duration_s)
            return await self._unless_stopping_next(answer)
        finally:
            if not recorded:
                del self._active[token]
                self.stats.job_ended(outcome, time.monotonic() - started)
                self.metrics.job_ended(job.name, outcome, time.monotonic() - started)
                if outcome == "retry" and self._stopping:  # cut off by the stop deadline
                    logger.warning(
                        "Job {} stays active until the stalled-job check moves it back"
                        " (within lock duration + stalled interval)",
                        job.id,
                    )

    @property
    def _fetch_next(self) -> bool:
        return not self._stopping and self._resume.is_set()

    async def _unless_stopping_next(self, answer: NextJob) -> ActiveJob | None:
        job = self._take(answer)
        await self._fail_poisoned()
        return None if job is None else await self._unless_stopping(job)

    def _job_log(self, job: ActiveJob) -> JobLog | None:
        """The attempt's BullMQ log: the job's `keepLogs` lines at most, else the setting's."""
        if not self.settings.job_log_lines:
            return None
        keep = job.opts.get("keepLogs")
        if type(keep) is not int or keep <= 0:
            keep = self.settings.job_log_lines
        return JobLog(keep, f"Attempt {job.attempt}/{job.max_attempts}{self._started_by}")

    async def _fail(
        self, job: ActiveJob, exc: Exception, log: JobLog | None = None, started: float = 0.0
    ) -> tuple[str, NextJob]:
        """Retry per the job's attempts and backoff, or fail it for good."""
        reason = str(exc)
        permanent = isinstance(exc, PermanentJobError)
        if permanent:
            logger.error("Job failed, not retried: {}", exc)
        else:
            logger.opt(exception=exc).error(
                "Job attempt {}/{} failed: {}", job.attempt, job.max_attempts, _reason(exc)
            )
        delay_ms = 0
        final = permanent or job.attempt >= job.max_attempts
        if not final:
            try:
                delay_ms = backoff_delay_ms(job.opts, job.attempt)
            except ValueError as bad:
                final = True
                logger.error("Job {} cannot be retried: {}", job.id, bad)
        elif not permanent:
            logger.error("Max retries reached for job {}", job.id)
        stack = stack_of(job, exc)
        if final:
            _end(log, job, started, f"failed for good: {_reason(exc)}")
            await self._tell_final_failure(job, exc, reason)
            answer = await self.protocol.fail(job, reason, stack, self._fetch_next, log)
            logger.error("Job failed for good: {} ({})", job.id, _reason(exc))
            return "failed", answer
        _end(log, job, started, f"failed: {_reason(exc)}; retried in {delay_ms} ms")
        await self.protocol.retry(job, reason, stack, delay_ms, log)
        logger.warning("Job {} will be retried: {}", job.id, _reason(exc))
        return "retry", NextJob(None)

    async def _tell_final_failure(self, job: ActiveJob, exc: Exception, reason: str) -> None:
        """The job type's on_final_failure hook, if it has one, before the job is marked failed
        (a crash in between runs it again on the job's next try, rather than never)."""
        hook = self.dispatcher.registry.final_failure_hook(job.name)
        if hook is None or isinstance(exc, InvalidPayload):  # not a job its processor takes
            return
        d = self.dispatcher
        failure = FinalFailure(job.id, job.data, reason, d.redis, d.state_key(job.id), logger)
        try:
            async with asyncio.timeout(FINAL_FAILURE_HOOK_S):
                await hook(failure)
        except Exception as hook_error:
            logger.warning("The failure hook of {} failed: {}", job.name, _reason(hook_error))

    async def _defer(
        self, job: ActiveJob, exc: Deferred, log: JobLog | None, started: float
    ) -> tuple[str, NextJob]:
        """Park the job in delayed without using an attempt. Waits the provider imposed (429s)
        add up per job, beside it in Redis; past WORKER_RATE_LIMIT_MAX_WAIT_S it fails."""
        wait_s = min(max(exc.delay_s, MIN_RATE_LIMIT_S), MAX_RATE_LIMIT_S)
        wait_s *= random.uniform(1.0, 1.0 + PARK_JITTER)
        if exc.refused:
            redis, cap_s = self.protocol.redis, self.settings.rate_limit_max_wait_s
            key = refused_wait_key(self.protocol.prefix, self.protocol.queue, job.id)
            waited_s = float(await redis.get(key) or 0)
            wait_s = min(wait_s, cap_s - waited_s)  # the last wait ends at the cap, not past it
            if wait_s <= 0:
                await redis.delete(key)  # a retry by hand starts with a full allowance
                reason = (
                    f"The AI service ({exc.provider}) kept refusing with rate limits (429) for"
                    f" {waited_s:.0f} s in total; gave up at WORKER_RATE_LIMIT_MAX_WAIT_S"
                    f" ({cap_s:g} s). Please try again later."
                )
                return await self._fail(job, PermanentJobError(reason), log, started)
            async with redis.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(key, wait_s)
                pipe.expire(key, round(cap_s) + REFUSED_TTL_S)
                await pipe.execute()
        _end(log, job, started, f"parked {wait_s:.1f} s, no attempt used: {exc}")
        await self.protocol.park(job, round(wait_s * 1000), log)
        logger.warning("Job {} parked {:.1f} s, no attempt used: {}", job.id, wait_s, exc)
        return "requeued", NextJob(None)

    async def _hand_back(self, job: ActiveJob, log: JobLog | None = None) -> None:
        """Back to waiting, first in line, no attempt used (moveJobFromActiveToWait)."""
        with logger.contextualize(job_id=job.id, job_name=job.name, attempt=job.attempt):
            await self._hand_back_logged(job, log)

    async def _hand_back_logged(self, job: ActiveJob, log: JobLog | None) -> None:
        try:
            code = await self.protocol.move_to_wait(job.id, job.token, log)
        except (RedisError, OSError) as exc:
            logger.warning("Could not return job {} to the queue: {}", job.id, exc)
            code = -1
        if code < 0:
            logger.warning(
                "Job {} stays active until the stalled-job check moves it back"
                " (within lock duration + stalled interval)",
                job.id,
            )
        else:
            self._requeued.append(job.id)

    async def _fail_poisoned(self) -> None:
        """Jobs whose hash cannot be decoded fail at once, for good: retrying cannot help."""
        while self._poisoned:
            job = self._poisoned.pop()
            self.stats.job_started()
            with logger.contextualize(job_id=job.id, attempt=job.attempts_made + 1):
                logger.error("Job failed, not retried: {}", job.reason)
                try:
                    await self.protocol.fail(job, job.reason, "[]", fetch_next=False)
                    logger.error("Job failed for good: {} ({})", job.id, job.reason)
                    self.stats.job_ended("failed", 0.0)
                    self.metrics.job_ended(UNDECODABLE, "failed", 0.0)
                except (RedisError, OSError, ValueError) as exc:
                    logger.error("Could not fail job {}: {}", job.id, _reason(exc))
                    self.stats.job_ended("retry", 0.0)
                    self.metrics.job_ended(UNDECODABLE, "retry", 0.0)

    # -- logs ----------------------------------------------------------------------------------

    def _log_pickup(self, job: ActiveJob) -> None:
        # The seed's pickup line, count and processing banner, as one line naming the job once
        # (the banner's Job ID and Job Type are the pickup line's id and name).
        if job_lines_on():
            job_line(
                f"Job picked up: {job.id} ({job.name}) | Attempt: {job.attempt}/"
                f"{job.max_attempts} | Currently processing: {self.stats.currently_processing}"
                f" jobs | Started: {_iso_now()}",
                job.id, job.name, job.attempt,
            )  # fmt: skip

    def _log_completed(self, job: ActiveJob, result: Any, duration_s: float) -> None:
        if job_lines_on():  # the result is encoded again only to log its size
            job_line(
                f"Job completed: {job.id} in {duration_s:.2f} s, result"
                f" {len(node_json(result).encode())} bytes | processed: {self.stats.processed},"
                f" success rate: {self.stats.success_rate}",
                job.id, job.name, job.attempt,
            )  # fmt: skip

    # -- chores --------------------------------------------------------------------------------

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chore_done)

    def _chore_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("Background task failed")

    async def _every(self, interval_s: float, chore: Any) -> None:
        """Run `chore` every `interval_s` until stop() cancels it, after the slots ended: locks
        must be renewed while running jobs drain. After a failure, sooner (the backoff's pause,
        at most `interval_s`): a lock about to lapse is renewed as soon as Redis answers."""
        name = chore.__name__.strip("_").replace("_", " ")
        pause_s = interval_s
        while True:
            await asyncio.sleep(pause_s)
            try:
                await chore()
            except (RedisError, OSError) as exc:
                pause_s = min(interval_s, await self._redis_failed(name, exc))
            else:
                pause_s = interval_s
                self.backoff.succeeded(name)

    async def _renew_locks(self) -> None:
        jobs = [(job.id, job.token) for job in self._active.values()]
        if not jobs:
            return
        for job_id in await self.protocol.extend_locks(jobs):
            for job in [job for job in self._active.values() if job.id == job_id]:
                with logger.contextualize(job_id=job.id, job_name=job.name, attempt=job.attempt):
                    logger.warning("Lock of job {} was lost; another worker may run it", job_id)

    async def _check_stalled(self) -> None:
        s = self.settings
        for job_id in await self.protocol.move_stalled_to_wait(
            s.max_stalled_count, s.stalled_interval_ms
        ):
            logger.warning("Job stalled and was moved back: {}", job_id)

    async def _keep_heartbeat(self) -> None:
        """The heartbeat, started again after a Redis error (it ended for good before)."""
        while True:
            try:
                await self._heartbeat_and_reclaim()
            except (RedisError, OSError) as exc:
                await asyncio.sleep(await self._redis_failed("heartbeat", exc))

    async def _heartbeat_and_reclaim(self) -> None:
        """Say this run is alive; take back what a crashed previous run of this identity held.

        The identity is stable across restarts (one process per RAILWAY_REPLICA_ID), so a
        previous run whose heartbeat has expired is dead, and its locks (tokens `<its id>:n`)
        guard jobs nobody runs. They go back to waiting at once instead of after lock duration
        + stalled interval. A run whose heartbeat still beats is alive: its jobs are left alone.
        """
        assert self.identity is not None
        redis = self.protocol.redis
        prefix, queue = self.protocol.prefix, self.protocol.queue
        runs_key = worker_runs_key(prefix, queue, self.identity)
        alive_key = worker_alive_key(prefix, queue, self.id)
        await redis.set(alive_key, self.identity, px=HEARTBEAT_TTL_MS)
        await redis.sadd(runs_key, self.id)
        await redis.expire(runs_key, RUNS_TTL_S)
        waited_until = time.monotonic() + HEARTBEAT_TTL_MS / 1000 + HEARTBEAT_S
        runs: set[str] = await redis.smembers(runs_key)  # type: ignore[assignment]  # decode_responses: str
        pending = {run for run in runs if run != self.id}
        while True:  # until stop() cancels it, after the slots: beat while jobs drain
            for run in list(pending):
                if await redis.exists(worker_alive_key(prefix, queue, run)):
                    continue  # alive, or not yet expired after a crash: look again
                pending.discard(run)
                await self._reclaim(run)
                await redis.srem(runs_key, run)
            if pending and time.monotonic() > waited_until:
                pending.clear()  # still beating: a live process shares this identity
            await asyncio.sleep(HEARTBEAT_S if not pending else 0.25)
            await redis.set(alive_key, self.identity, px=HEARTBEAT_TTL_MS)
            self.backoff.succeeded("heartbeat")

    async def _reclaim(self, run: str) -> None:
        taken = []
        for job_id, token in (await self.protocol.locks_of_active()).items():
            if token.startswith(f"{run}:") and await self.protocol.move_to_wait(job_id, token) >= 0:
                taken.append(job_id)
        if taken:
            logger.warning(
                "Took back {} job(s) held by a crashed previous run of this worker ({}): {}",
                len(taken),
                self.identity,
                ", ".join(taken),
            )

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when stop() begins."""
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)
        except TimeoutError:
            pass


def _waited_s(job: ActiveJob) -> float | None:
    """Enqueue (its timestamp, plus its delay) to this start, for a job's first attempt."""
    if job.attempts_made or not job.timestamp:
        return None
    delay = job.opts.get("delay")
    return (now_ms() - job.timestamp - (delay if type(delay) is int else 0)) / 1000


def _end(log: JobLog | None, job: ActiveJob, started: float, how: str) -> None:
    """The attempt's last line in its BullMQ log: how it ended and how long it ran."""
    if log is not None:
        ms = (time.monotonic() - started) * 1000
        log.end(f"Attempt {job.attempt}/{job.max_attempts} {how} after {ms:.0f} ms")


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
