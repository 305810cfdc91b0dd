"""worker/autopipeline.py against a real Redis: batching when busy, each caller's own reply or
error, scripts reloaded after NOSCRIPT, cancelled callers never sent."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.support.harness import eventually, running_service, settings_for
from worker.autopipeline import AutoPipelinedScript
from worker.protocol import COMMAND_SOCKET_DEAD_S

# Echoes its argument; fails for "bad"; records every call in a list so we see what was sent.
SCRIPT = """
if ARGV[1] == "bad" then return redis.error_reply("ERR bad argument") end
redis.call("RPUSH", KEYS[1], ARGV[1])
return "echo:" .. ARGV[1]
"""


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=4)
    yield c
    await c.aclose()


class Counted(AutoPipelinedScript):
    """Counts what went out as one command and what went out as pipelines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipelines: list[int] = []

    async def _execute(self, batch: list[Any]) -> list[Any]:
        self.pipelines.append(len(batch))
        return await super()._execute(batch)


@pytest.fixture
async def echo(client: aioredis.Redis) -> AsyncIterator[tuple[str, Counted]]:
    """A list key and the script over one lane. A comment makes the SHA unique: Redis has
    never seen it, so its first EVALSHA answers NOSCRIPT."""
    key = f"test-autopipe-{uuid.uuid4().hex}"
    script = client.register_script(f"-- {uuid.uuid4()}\n{SCRIPT}")
    yield key, Counted(script, max_in_flight=1)
    await client.delete(key)


async def test_the_calls_of_one_loop_turn_go_out_as_one_write(
    echo: tuple[str, Counted], client: aioredis.Redis
) -> None:
    key, script = echo
    replies = await asyncio.gather(*(script(keys=[key], args=[str(i)]) for i in range(40)))
    assert replies == [f"echo:{i}" for i in range(40)]  # each caller its own reply
    # The 40 calls of one loop turn leave as one write (and, meeting NOSCRIPT, go again
    # together once the script is loaded): never one round trip each.
    assert script.pipelines == [40], script.pipelines
    assert sorted(await client.lrange(key, 0, -1), key=int) == [str(i) for i in range(40)]


async def test_one_callers_error_is_that_callers_alone(
    echo: tuple[str, Counted], client: aioredis.Redis
) -> None:
    key, script = echo
    args = ["a", "bad", "b", "bad", "c"]
    results = await asyncio.gather(
        *(script(keys=[key], args=[a]) for a in args), return_exceptions=True
    )
    assert script.pipelines, "nothing was batched"
    for arg, result in zip(args, results, strict=True):
        if arg == "bad":
            assert isinstance(result, ResponseError) and "bad argument" in str(result)
        else:
            assert result == f"echo:{arg}"


async def test_a_batch_on_a_script_redis_does_not_know_loads_it_and_answers_all(
    echo: tuple[str, Counted], client: aioredis.Redis
) -> None:
    # After a Redis restart or SCRIPT FLUSH every EVALSHA of a pipeline answers NOSCRIPT.
    key, script = echo
    script._in_flight = 1  # hold the only lane, so the calls below queue up
    calls = [asyncio.ensure_future(script(keys=[key], args=[str(i)])) for i in range(5)]
    await asyncio.sleep(0)
    script._in_flight = 0
    script._send_pending()
    assert await asyncio.gather(*calls) == [f"echo:{i}" for i in range(5)]
    assert script.pipelines == [5]
    assert await client.script_exists(script.script.sha) == [True]
    assert await client.lrange(key, 0, -1) == [str(i) for i in range(5)]


async def test_a_caller_cancelled_while_waiting_is_never_sent(
    echo: tuple[str, Counted], client: aioredis.Redis
) -> None:
    key, script = echo
    script._in_flight = 1  # hold the only lane, so the calls below queue up
    waiting = [asyncio.ensure_future(script(keys=[key], args=[f"w{i}"])) for i in range(3)]
    await asyncio.sleep(0)
    waiting[1].cancel()
    await asyncio.sleep(0)
    script._in_flight = 0
    script._send_pending()
    assert await waiting[0] == "echo:w0" and await waiting[2] == "echo:w2"
    assert waiting[1].cancelled()
    assert await client.lrange(key, 0, -1) == ["w0", "w2"]
    assert script.pipelines == [2]


async def test_command_sockets_are_bounded_by_tcp_not_by_a_timer(
    redis_url: str, queue_name: str
) -> None:
    # No per-command socket timeout (it cost 9 % CPU per job); the kernel cuts dead peers.
    async with running_service(settings_for(redis_url, queue_name)) as service:
        assert service.worker is not None
        conn = service.worker.protocol.redis
        await conn.ping()
        pooled = await eventually(lambda: _a_pooled_connection(conn))
        assert pooled.socket_timeout is None
        sock = pooled._writer.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            timeout_ms = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert timeout_ms == COMMAND_SOCKET_DEAD_S * 1000
        # The blocking connection keeps its socket timeout, longer than any blocking wait.
        blocking = service.worker.protocol.blocking.connection_pool
        assert blocking.connection_kwargs["socket_timeout"] > 10


async def _a_pooled_connection(conn: aioredis.Redis) -> Any:
    available = list(conn.connection_pool._available_connections)
    return available[0] if available else None


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "a" * 40, 2, b"k1", "k2", 1764500000123, b"\x80\x00\xff", "Grüße 日本語", ""),
        ("EVALSHA", "a" * 40, 1, "k", "x" * 100_000),  # beyond redis-py's chunking cutoff
    ],
)
def test_the_c_packer_writes_the_bytes_redis_py_would(args: tuple[Any, ...]) -> None:
    from worker.autopipeline import _pack

    conn = aioredis.Redis(encoding_errors="surrogateescape").connection_pool.make_connection()
    assert _pack(conn, args) == b"".join(conn.pack_command(*args))


def test_a_value_the_c_packer_refuses_is_packed_by_redis_py() -> None:
    from worker.autopipeline import _pack

    conn = aioredis.Redis(encoding_errors="surrogateescape").connection_pool.make_connection()
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # as read from a job hash
    import hiredis

    with pytest.raises(UnicodeEncodeError):  # the C packer refuses it...
        hiredis.pack_command(("EVALSHA", "a" * 40, 0, undecodable))
    wire = _pack(conn, ("EVALSHA", "a" * 40, 0, undecodable))  # ...so redis-py packs it
    assert wire == b"".join(conn.pack_command("EVALSHA", "a" * 40, 0, undecodable))
    assert b"caf\xe9" in wire
