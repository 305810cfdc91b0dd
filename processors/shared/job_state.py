"""Resumable per-job state in a Redis hash beside the job (`JobContext.state_key`).

A processor that pays for several steps records each finished step here, so a retry, a
stalled-job recovery or a restart after `kill -9` carries on instead of starting over. Every
value is JSON; every write is one MULTI/EXEC that also renews the TTL, so a write is either
wholly there or not at all. Each finished OpenAI call is saved together with its token usage,
as "pending accounting", in the same write as the step's result; the `increment_tokens` RPC
that follows clears it, and `settle_usage` repeats the RPC for a call whose accounting a crash
interrupted. The hash outlives the job's attempts (STATE_TTL_S) and, once the job has its
result, is kept only long enough to answer a re-run after a crash between "processor returned"
and "job marked completed" (RESULT_TTL_S).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

# Longer than any job lives in BullMQ (removeOnFail keeps a failed job 24 h; a person may
# retry it from there): the state must still be there to resume from.
STATE_TTL_S = 7 * 86_400
# After success: covers a crash between returning the result and BullMQ marking the job
# completed (lock duration + stalled interval, 60 s by default), with a wide margin.
RESULT_TTL_S = 3_600

TOKENS = "tokens"  # running sum of usage.total_tokens over every call of the job
CALLS = "calls"  # how many billed calls the job has made
PENDING_USAGE = "pending_usage"  # {"input", "output"}: billed, not yet sent to increment_tokens
RESULT = "result"  # the processor's return value, once it has one

Account = Callable[[int, int], Awaitable[Any]]


class JobState:
    """A snapshot of the hash, read once, and writes that keep the snapshot in step."""

    def __init__(self, redis: Redis, key: str, fields: Mapping[str, Any] | None = None) -> None:
        self.redis = redis
        self.key = key
        self.fields: dict[str, Any] = dict(fields or {})

    @classmethod
    async def load(cls, redis: Redis, key: str) -> JobState:
        raw = await redis.hgetall(key)
        return cls(redis, key, {_text(k): json.loads(_text(v)) for k, v in raw.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def tokens(self) -> int:
        return int(self.fields.get(TOKENS) or 0)

    @property
    def calls(self) -> int:
        return int(self.fields.get(CALLS) or 0)

    @property
    def is_fresh(self) -> bool:
        """True when nothing was recorded yet (a first run)."""
        return not self.fields

    async def put(self, values: Mapping[str, Any]) -> None:
        """Set fields (JSON-encoded) and renew the TTL, in one transaction."""
        await self._write(values)

    async def put_new(self, name: str, value: Any) -> tuple[Any, bool]:
        """HSETNX: `(the stored value, True when this call stored it)`.

        Two runners of one job (a stalled job recovered while the old runner still lives)
        agree on the value: whoever comes second reads the first one's.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.key, name, _encode(value))
            pipe.hget(self.key, name)
            pipe.expire(self.key, STATE_TTL_S)
            created, stored, _ = await pipe.execute()
        self.fields[name] = json.loads(_text(stored))
        return self.fields[name], bool(created)

    async def record_call(
        self, input_tokens: int, output_tokens: int, total_tokens: int, values: Mapping[str, Any]
    ) -> None:
        """A finished, billed call: its usage and (when usable) its result, in one write."""
        pending = {"input": input_tokens, "output": output_tokens}
        await self._write(
            {**values, PENDING_USAGE: pending}, add_tokens=total_tokens, add_call=True
        )

    async def settle_usage(self, account: Account) -> None:
        """Send the pending usage (if any) to `account(input, output)`, then forget it."""
        pending = self.fields.get(PENDING_USAGE)
        if not pending:
            return
        await account(int(pending.get("input") or 0), int(pending.get("output") or 0))
        await self.redis.hdel(self.key, PENDING_USAGE)
        self.fields.pop(PENDING_USAGE, None)

    async def finish(self, result: Any) -> None:
        """Keep the result for a re-run after a crash; let the rest expire soon."""
        await self._write({RESULT: result}, ttl_s=RESULT_TTL_S)

    async def _write(
        self,
        values: Mapping[str, Any],
        *,
        add_tokens: int = 0,
        add_call: bool = False,
        ttl_s: int = STATE_TTL_S,
    ) -> None:
        counters = {TOKENS: add_tokens, CALLS: int(add_call)}
        async with self.redis.pipeline(transaction=True) as pipe:
            if values:
                pipe.hset(self.key, mapping={k: _encode(v) for k, v in values.items()})
            for name, by in counters.items():
                if by:
                    pipe.hincrby(self.key, name, by)
            pipe.expire(self.key, ttl_s)
            replies = await pipe.execute()
        self.fields.update(values)
        counted = iter(replies[1 if values else 0 :])
        for name, by in counters.items():
            if by:
                self.fields[name] = int(next(counted))


def _encode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text(value: str | bytes) -> str:
    # The worker's connection decodes replies; a test's may not.
    return value.decode("utf-8") if isinstance(value, bytes) else value
