"""A Lua script called from many slots: calls that find every lane busy go out together.

ioredis in Node writes the commands of many jobs to its socket back to back; redis-py sends
each one by itself, waits for its reply, and pays a pooled connection per call. Here a call
goes out at once while fewer than `max_in_flight` are under way (always, at low concurrency);
the calls that arrive meanwhile wait and leave as one non-transactional pipeline as soon as a
lane frees: one write, one read, one connection for all of them. Each caller gets its own
reply or error, as if it had called alone. With 50 slots this doubled the worker's no-op
throughput (bench/FINDINGS.md).

A lane is a connection of its own, not one borrowed from the client's pool per call: a call
then costs one packed write and one read, without redis-py's pool checkout, retry wrapper and
reply callbacks (78 -> 44 us of CPU per EVALSHA, measured against a local Redis). A lane whose
connection fails is dropped, and that call is sent again the ordinary way, with the client's
retry policy (a script whose reply was lost may then answer "missing lock": the caller sees it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_c_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # the C packer of hiredis (a dependency: redis[hiredis]); redis-py's async one is Python
    from hiredis import pack_command as _c_pack
except ImportError:  # pragma: no cover - hiredis is in the lock file
    _c_pack = None


class AutoPipelinedScript:
    def __init__(self, script: AsyncScript, max_in_flight: int) -> None:
        self.script = script
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._pending: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._idle: list[AbstractConnection] = []  # lanes' connections not in use

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        if client is not None:  # an explicit client or pipeline: not ours to batch
            return await self.script(keys=keys, args=args, client=client)
        if self._in_flight < self.max_in_flight:  # a connection is free: send it now
            self._in_flight += 1
            try:
                return await self._send_one(keys, args)
            finally:
                self._in_flight -= 1
                self._send_pending()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        return await future

    async def _send_one(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        client = self.script.registered_client
        assert isinstance(client, Redis), "lanes are for a single-node client"
        pool = client.connection_pool
        conn = self._idle.pop() if self._idle else pool.make_connection()  # type: ignore[no-untyped-call]
        healthy = False
        try:
            packed = _pack(conn, ("EVALSHA", self.script.sha, len(keys), *keys, *args))
            await conn.send_packed_command(packed, check_health=False)
            reply = await conn.read_response()
            healthy = True
        except ResponseError as exc:  # an answer: the connection is fine
            healthy = True
            if not isinstance(exc, NoScriptError):
                raise
            return await self.script(keys=keys, args=args)  # loads the script, sends again
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return await self.script(keys=keys, args=args)  # pool + retry policy
        finally:
            if healthy:
                self._idle.append(conn)
            else:  # failed, or cancelled mid-reply: its stream can no longer be trusted
                await _drop(conn)
        return reply

    async def aclose(self) -> None:
        """Close the lanes' connections (the client's pool is closed by its owner)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)

    def _send_pending(self) -> None:
        if not self._pending or self._in_flight >= self.max_in_flight:
            return
        # A caller cancelled while waiting (shutdown) is not sent, as if it had never called.
        batch = [call for call in self._pending if not call[2].done()]
        self._pending = []
        if not batch:
            return
        self._in_flight += 1
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            replies = await self._execute(batch)
        except Exception as exc:
            replies = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            self._send_pending()
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
                try:
                    reply = await self.script(keys=keys, args=args)  # loads it again
                except Exception as exc:
                    reply = exc
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(
        self, batch: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        async with self.script.registered_client.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self.script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def _pack(conn: AbstractConnection, command: tuple[Any, ...]) -> bytes | list[bytes]:
    """hiredis's C packer: ~3 us for a moveToFinished call, where redis-py's async connection
    packs it in Python in ~20 us. Anything it refuses (a str with lone surrogates, which the
    connection writes back as the bytes they came from) is packed by redis-py as before."""
    if _c_pack is not None:
        try:
            packed: bytes = _c_pack(command)
            return packed
        except (TypeError, UnicodeEncodeError):
            pass
    return conn.pack_command(*command)


async def _drop(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # closing a broken socket: nothing left to do
        pass
