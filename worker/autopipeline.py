"""A Lua script called from many slots: the calls of one event-loop turn go out as one write.

ioredis in Node writes every command issued in the same tick to its socket at once; redis-py
sends each command by itself and waits for its reply. Here a call joins a batch that leaves at
the end of the current loop turn, on a free lane: one write and one read for all of them, the
cost that dominates a no-op job (the loopback write wakes Redis inside our syscall: a third of
the worker's CPU in a py-spy profile of the no-op benchmark). Each caller gets its own reply or
error, as if it had called alone. Calls that arrive while every lane is busy wait and leave
together as soon as one frees (with 50 slots this doubled no-op throughput, bench/FINDINGS.md).

A lane is a connection of its own, not one borrowed from the client's pool per call: a batch
costs one packed write and one read per reply, without redis-py's pool checkout, retry wrapper
and reply callbacks (78 -> 44 us of CPU per EVALSHA, measured against a local Redis). A lane
whose connection fails is dropped, and its calls are sent again the ordinary way, with the
client's retry policy (a script whose reply was lost may then answer "missing lock": the
caller sees it). Scripts Redis does not know (after a restart or SCRIPT FLUSH) are loaded once
and the calls that met NOSCRIPT sent again.
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

Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]
LANE_FAILURES = (RedisConnectionError, RedisTimeoutError, OSError)


class AutoPipelinedScript:
    def __init__(self, script: AsyncScript, max_in_flight: int) -> None:
        self.script = script
        self.max_in_flight = max_in_flight  # lanes
        self._in_flight = 0  # lanes busy with a batch
        self._pending: list[Call] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()
        self._idle: list[AbstractConnection] = []  # lanes' connections not in use
        # A cluster client: no lanes (a lane is one node's connection, and the slot may move);
        # each call goes through the client, which follows MOVED and ASK.
        self.direct = not isinstance(script.registered_client, Redis)

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        if client is not None or self.direct:  # an explicit client or pipeline: not ours
            return await self.script(keys=keys, args=args, client=client)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        if not self._flush_scheduled:  # the other calls of this turn join the same batch
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._send_pending()

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

    async def _send(self, batch: list[Call]) -> None:
        try:
            replies = await self._execute(batch)
        except Exception as exc:
            replies = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            self._send_pending()
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            replies = await self._after_noscript(batch, replies, unknown)
        for (keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, LANE_FAILURES):  # the lane broke: the ordinary way, retried
                try:
                    reply = await self.script(keys=keys, args=args)
                except Exception as exc:
                    reply = exc
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _after_noscript(
        self, batch: list[Call], replies: list[Any], unknown: list[int]
    ) -> list[Any]:
        replies = list(replies)
        try:
            await self.script.registered_client.script_load(self.script.script)
            again = await self._round_trip([batch[i] for i in unknown])
        except Exception as exc:
            again = [exc] * len(unknown)
        for i, reply in zip(unknown, again, strict=True):
            replies[i] = reply
        return replies

    async def _execute(self, batch: list[Call]) -> list[Any]:
        """One round trip for the batch; each reply, or the error Redis answered, in order."""
        return await self._round_trip(batch)

    async def _round_trip(self, batch: list[Call]) -> list[Any]:
        conn = self._lane()
        healthy = False
        try:
            sha = self.script.sha
            packed = [_pack(conn, ("EVALSHA", sha, len(keys), *keys, *args))
                      for keys, args, _ in batch]  # fmt: skip
            await conn.send_packed_command(b"".join(packed), check_health=False)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # an answer: the stream is still in step
                    replies.append(exc)
            healthy = True
            return replies
        finally:
            if healthy:
                self._idle.append(conn)
            else:  # failed, or cancelled mid-reply: its stream can no longer be trusted
                await _drop(conn)

    def _lane(self) -> AbstractConnection:
        if self._idle:
            return self._idle.pop()
        client = self.script.registered_client
        assert isinstance(client, Redis), "lanes are for a single-node client"
        conn: AbstractConnection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        return conn

    async def aclose(self) -> None:
        """Wait for batches under way, then close the lanes' connections (the client's pool is
        closed by its owner)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        await self.drop_idle()

    async def drop_idle(self) -> None:
        """Close the lanes not in use: the next batch connects afresh (after a failover)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)


def _pack(conn: AbstractConnection, command: tuple[Any, ...]) -> bytes:
    """hiredis's C packer: ~3 us for a moveToFinished call, where redis-py's async connection
    packs it in Python in ~20 us. Anything it refuses (a str with lone surrogates, which the
    connection writes back as the bytes they came from) is packed by redis-py as before."""
    if _c_pack is not None:
        try:
            return _c_pack(command)
        except (TypeError, UnicodeEncodeError):
            pass
    return b"".join(conn.pack_command(*command))


async def _drop(conn: AbstractConnection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # closing a broken socket: nothing left to do
        pass
