"""Asyncio client for tests/node/bridge.mjs, which acts as the Node web service's producer."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections import deque
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BRIDGE_SCRIPT = REPO_ROOT / "tests" / "node" / "bridge.mjs"
DEFAULT_TIMEOUT = 30.0
_LINE_LIMIT = 64 * 1024 * 1024  # getJob answers carry whole payloads
_STDERR_LINES = 200


class NodeBridgeError(RuntimeError):
    """The bridge answered with an error, timed out or died."""


class NodeBridge:
    """One `node tests/node/bridge.mjs` process; one method per bridge op."""

    def __init__(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        self._proc = proc
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._stderr_task = asyncio.create_task(self._pump_stderr())
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = False
        self.bullmq_version = ""

    @classmethod
    async def start(
        cls,
        version: str,
        redis_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> NodeBridge:
        """Start the bridge for bullmq major `version` ("5" or "6") and wait until it is ready.
        `env`: more variables, e.g. NODE_EXTRA_CA_CERTS for a `rediss://` with a private CA."""
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(BRIDGE_SCRIPT),
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {}), "BULLMQ_VERSION": version, "REDIS_URL": redis_url},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        bridge = cls(proc, timeout)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            ready = json.loads(line) if line else {}
            if not ready.get("ready"):
                raise NodeBridgeError(f"bridge did not start (first line {line!r})")
        except TimeoutError:
            await bridge._kill()
            raise NodeBridgeError(
                bridge._describe(f"bridge start failed: not ready within {timeout} s")
            ) from None
        except (ValueError, NodeBridgeError) as exc:
            await bridge._kill()
            raise NodeBridgeError(bridge._describe(f"bridge start failed: {exc}")) from exc
        bridge.bullmq_version = ready["bullmq"]
        bridge._reader_task = asyncio.create_task(bridge._read_answers())
        return bridge

    # -- ops -----------------------------------------------------------------------------

    async def add(
        self,
        queue: str,
        name: str,
        data: Any,
        opts: dict[str, Any] | None = None,
        *,
        prefix: str | None = None,
    ) -> dict[str, Any]:
        """Enqueue like the web service; returns {id, addedAt}."""
        return await self.call("add", queue=queue, name=name, data=data, opts=opts, prefix=prefix)

    async def add_bulk(
        self, queue: str, jobs: list[dict[str, Any]], *, prefix: str | None = None
    ) -> dict[str, Any]:
        """Enqueue [{name, data, opts?}] with the web service defaults; returns {ids}."""
        return await self.call("addBulk", queue=queue, jobs=jobs, prefix=prefix)

    async def get_job(
        self, queue: str, job_id: str, *, prefix: str | None = None
    ) -> dict[str, Any] | None:
        """Read a job back as the web service does (None when it is gone)."""
        return await self.call("getJob", queue=queue, jobId=job_id, prefix=prefix)

    async def contract_enqueue(
        self,
        queue: str,
        name: str,
        payload: Any,
        opts: dict[str, Any] | None = None,
        *,
        prefix: str | None = None,
    ) -> dict[str, Any]:
        """Enqueue through the contract package's `enqueue` (validated, web service options).

        Returns {id}, or {rejected: True, message, errors: [{path, problem, keyword}]} when the
        package refuses the payload (nothing is enqueued then).
        """
        return await self.call(
            "contractEnqueue", queue=queue, name=name, payload=payload, opts=opts, prefix=prefix
        )

    async def validate(self, kind: str, name: str, value: Any) -> dict[str, Any]:
        """The contract package's validatePayload/validateResult (ajv): {valid, errors}."""
        return await self.call("validate", kind=kind, name=name, value=value)

    async def web_stats(self, queue: str) -> dict[str, Any]:
        """The `stats` object of the web service's /api/queue/stats, keys in its order."""
        return await self.call("webStats", queue=queue)

    async def counts(self, queue: str, *, prefix: str | None = None) -> dict[str, int]:
        """getJobCounts() plus the web service's `total`."""
        return await self.call("counts", queue=queue, prefix=prefix)

    async def web_enqueue(
        self, queue: str, name: str, data: Any, opts: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The web service's flow: cache GET first; {cached, jobId, result} or {cached, id}."""
        return await self.call("webEnqueue", queue=queue, name=name, data=data, opts=opts)

    async def idempotency(self, key: str) -> dict[str, Any] | None:
        """Raw idempotency value: {raw, parsed, restringified}, or None when missing."""
        return await self.call("idempotency", key=key)

    async def wait_finished(
        self, queue: str, job_id: str, timeout_ms: int = 10_000, *, prefix: str | None = None
    ) -> dict[str, Any]:
        """Poll until the job is completed or failed; returns the get_job shape."""
        return await self.call(
            "waitFinished",
            queue=queue,
            jobId=job_id,
            timeoutMs=timeout_ms,
            prefix=prefix,
            timeout=max(self._timeout, timeout_ms / 1000 + 5),
        )

    async def start_worker(
        self,
        queue: str,
        *,
        concurrency: int = 20,
        limiter: dict[str, int] | None = None,
        prefix: str | None = None,
        name: str | None = None,
    ) -> None:
        """A Node BullMQ worker on `queue` (serves `ping`), as the old Node worker ran."""
        await self.call(
            "startWorker",
            queue=queue,
            concurrency=concurrency,
            limiter=limiter,
            prefix=prefix,
            name=name,
        )

    async def stop_worker(self, queue: str, *, prefix: str | None = None) -> dict[str, Any]:
        """Close it; returns {completed, jobIds}: what the Node worker processed."""
        return await self.call("stopWorker", queue=queue, prefix=prefix)

    async def get_workers(self, queue: str, *, prefix: str | None = None) -> list[dict[str, str]]:
        """`queue.getWorkers()`: [{name (the queue), rawname (the connection's name)}]."""
        return await self.call("getWorkers", queue=queue, prefix=prefix)

    async def get_job_logs(
        self, queue: str, job_id: str, *, prefix: str | None = None
    ) -> dict[str, Any]:
        """`queue.getJobLogs(id)`: {logs: [lines, oldest first], count}."""
        return await self.call("getJobLogs", queue=queue, jobId=job_id, prefix=prefix)

    async def get_metrics(
        self, queue: str, kind: str, *, prefix: str | None = None
    ) -> dict[str, Any]:
        """`queue.getMetrics('completed'|'failed')`: {meta: {count, ...}, data, count}."""
        return await self.call("getMetrics", queue=queue, type=kind, prefix=prefix)

    async def export_prometheus_metrics(self, queue: str, *, prefix: str | None = None) -> str:
        """`queue.exportPrometheusMetrics()`: BullMQ's own exposition text."""
        return await self.call("exportPrometheusMetrics", queue=queue, prefix=prefix)

    async def obliterate(self, queue: str, *, prefix: str | None = None) -> None:
        """Remove the queue and all its jobs (force)."""
        await self.call("obliterate", queue=queue, prefix=prefix)

    async def aclose(self) -> None:
        """Ask the bridge to close its queues and exit; kill it if it does not."""
        if self._closed:
            return
        try:
            if self._proc.returncode is None:
                with contextlib.suppress(NodeBridgeError):
                    await self.call("close", timeout=5)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), 5)
        finally:
            self._closed = True
            await self._kill()

    async def __aenter__(self) -> NodeBridge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------------

    async def call(self, op: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Send one request and wait for its answer; None-valued args are left out."""
        if self._closed or self._reader_task is None or self._reader_task.done():
            raise NodeBridgeError(self._describe(f"bridge is not running (op {op})"))
        request_id = next(self._ids)
        request = {"id": request_id, "op": op}
        request.update({k: v for k, v in args.items() if v is not None})
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        limit = self._timeout if timeout is None else timeout
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            await self._proc.stdin.drain()
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise NodeBridgeError(
                self._describe(f"bridge op {op} (id {request_id}) timed out after {limit} s")
            ) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise NodeBridgeError(self._describe(f"bridge op {op}: {exc!r}")) from exc
        finally:
            self._pending.pop(request_id, None)

    async def _read_answers(self) -> None:
        assert self._proc.stdout is not None
        try:
            while line := await self._proc.stdout.readline():
                answer = json.loads(line)
                future = self._pending.get(answer.get("id"))
                if future is None or future.done():
                    continue  # its caller timed out
                if answer.get("ok"):
                    future.set_result(answer.get("result"))
                else:
                    future.set_exception(NodeBridgeError(self._describe(answer.get("error"))))
        except Exception as exc:  # unreadable line: fail everyone rather than hang
            self._fail_pending(f"bridge reader failed: {exc!r}")
            raise
        await self._proc.wait()
        self._fail_pending(f"bridge exited with code {self._proc.returncode}")

    async def _pump_stderr(self) -> None:
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            self._stderr.append(line.decode(errors="replace").rstrip("\n"))

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NodeBridgeError(self._describe(reason)))

    def _describe(self, message: object) -> str:
        stderr = "\n".join(self._stderr)
        return f"{message}\n--- bridge stderr ---\n{stderr}" if stderr else str(message)

    async def _kill(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1)  # keep its last words
        for task in (self._reader_task, self._stderr_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
