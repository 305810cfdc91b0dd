"""The monthly AI budget per user and token accounting, kept in Supabase (INTEROP §5).

`Budget.reserve` runs before an OpenAI call and raises `OverBudget` (permanent) when the
user's spend so far, plus what calls in flight have reserved, plus the estimate for this call
would exceed the allowance; otherwise it holds the estimate in Redis until the call is settled
(`Reservation.settle`, after `Budget.record` has added the real tokens through the
`increment_tokens` RPC) or released. So N concurrent jobs of one user, on any replicas, cannot
each spend the same remaining allowance.

How the hold works (one Lua script decides, so two reservations never both take the last of
the allowance): per user and month, `budget:<user>:<YYYY-MM>:reserved` is a sorted set of
holds (member `<id>:<micro-USD>`, score the end of its lease, RESERVATION_LEASE_S, so the hold
of a worker that died mid-call lapses on its own), and `...:settled` counts the micro-USD
settled so far. A reservation reads `settled`, then Supabase, then asks the script, which adds
whatever was settled in between: a read of Supabase that raced another call's settlement
counts that call once or twice, never zero times. Recording happens before settling for the
same reason. On a Redis Cluster the two are `{budget:<user>:<YYYY-MM>}:reserved` and
`...:settled`, in one slot (worker/keys.py); on one Redis, the names above.

When Supabase cannot be read, no reservation and no call are made: the job's attempt fails as
retryable (BullMQ backoff), as before. When `increment_tokens` fails, the failure is logged and
the hold is settled anyway: those tokens are missing from the month's total (as before).
Without Supabase all of this is off (`Budget.disabled()`), and `build` says so in its notes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from loguru import logger as _default_logger
from postgrest import APIError

from processors.shared.supabase_client import SupabaseSettings, make_client
from worker.errors import PermanentJobError, RetryableJobError
from worker.keys import budget_key
from worker.providers import Lua, is_cluster, key_prefix

if TYPE_CHECKING:
    from loguru import Logger
    from postgrest import AsyncPostgrestClient
    from redis.asyncio import Redis

    from worker.joblog import JobLogger

INPUT_USD_PER_MTOK = 0.60
OUTPUT_USD_PER_MTOK = 2.40
MONTHLY_BUDGET_USD = 5.00
OUTPUT_PER_INPUT_TOKEN = 2.5
TOKENS_PER_MESSAGE_OVERHEAD = 4
CHARS_PER_TOKEN = 4
INVALID_TEXT_REPRESENTATION = "22P02"  # Postgres: e.g. `id=eq.<not a uuid>`
# A hold lapses after this long, so a worker killed mid-call does not keep it: no call lives
# longer than its job's attempt (WORKER_JOB_TIMEOUT_S, 600 s by default).
RESERVATION_LEASE_S = 600
MONTH_KEYS_TTL_S = 40 * 86_400  # the month's holds and settled total outlive the month
MICRO = 1_000_000

# KEYS reserved, settled; ARGV spent, settled as read before Supabase, estimate, budget (all
# micro-USD), lease ms, member, keys' TTL ms. Answers {reserved 1 or refused 0, committed}.
RESERVE_LUA = """
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local held = 0
for _, member in ipairs(redis.call("ZRANGE", KEYS[1], 0, -1)) do
  held = held + (tonumber(string.match(member, ":(%d+)$")) or 0)
end
local since = (tonumber(redis.call("GET", KEYS[2]) or "") or 0) - tonumber(ARGV[2])
local committed = tonumber(ARGV[1]) + math.max(since, 0) + held
if committed + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return {0, committed} end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[5]), ARGV[6])
redis.call("PEXPIRE", KEYS[1], ARGV[7])
return {1, committed}
"""
_RESERVE = Lua(RESERVE_LUA)

# Exact wording: the web service shows it to the user (INTEROP §4).
OVER_BUDGET_MESSAGE = (
    "This AI usage exceeds your monthly allowance. Please try with shorter content or wait "
    "until next month when your budget resets."
)

NOT_CONFIGURED_NOTE = (
    "Supabase not configured (EXPO_PUBLIC_SUPABASE_URL / SUPABASE_URL and a key): "
    "budget checks and token accounting are off"
)
ANON_KEY_NOTE = (
    "Supabase key is {variable}, not SUPABASE_SERVICE_ROLE_KEY: row-level security may hide "
    "users rows (budget read as 0) and refuse increment_tokens"
)


class OverBudget(PermanentJobError):
    def __init__(self) -> None:
        super().__init__(OVER_BUDGET_MESSAGE)


def cost_usd(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * INPUT_USD_PER_MTOK + output_tokens * OUTPUT_USD_PER_MTOK) / 1_000_000


@dataclass(frozen=True)
class TokenEstimate:
    input_tokens: int
    output_tokens: int

    @property
    def cost_usd(self) -> float:
        return cost_usd(self.input_tokens, self.output_tokens)

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def estimate_tokens(messages: Iterable[Mapping[str, Any]]) -> TokenEstimate:
    """input ≈ Σ(ceil(len(content)/4) + 4) over the messages; output ≈ ceil(input × 2.5)."""
    input_tokens = sum(
        math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE_OVERHEAD
        for m in messages
    )
    return TokenEstimate(input_tokens, math.ceil(input_tokens * OUTPUT_PER_INPUT_TOKEN))


class Budget:
    """Budget check and token accounting for one Supabase project (or none)."""

    def __init__(
        self,
        client: AsyncPostgrestClient | None,
        http: httpx.AsyncClient | None = None,
        *,
        monthly_budget_usd: float = MONTHLY_BUDGET_USD,
        notes: tuple[str, ...] = (),
        key_prefix: str = "",
    ) -> None:
        self.client = client  # shared with processors that write rows (generate-lesson)
        self._http = http
        self.monthly_budget_usd = monthly_budget_usd
        self.notes = notes
        self.key_prefix = key_prefix  # PROTECTION_KEY_PREFIX: empty but in tests

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Budget:
        """ConfigError for half a Supabase configuration; disabled when there is none."""
        return cls.from_settings(SupabaseSettings.from_env(env), key_prefix(env))

    @classmethod
    def from_settings(cls, settings: SupabaseSettings | None, key_prefix: str = "") -> Budget:
        """Disabled when Supabase is not configured (None)."""
        if settings is None:
            return cls.disabled()
        client, http = make_client(settings)
        notes = (
            ()
            if settings.uses_service_role
            else (ANON_KEY_NOTE.format(variable=settings.key_variable),)
        )
        return cls(client, http, notes=notes, key_prefix=key_prefix)

    @classmethod
    def disabled(cls) -> Budget:
        return cls(None, notes=(NOT_CONFIGURED_NOTE,))

    @property
    def enabled(self) -> bool:
        return self.client is not None

    async def spent_usd(self, user_id: str, log: JobLogger | Logger = _default_logger) -> float:
        """What the user's recorded tokens cost so far this month (0 for an unknown user)."""
        assert self.client is not None
        try:
            response = await (
                self.client.table("users")
                .select("input_tokens,output_tokens")
                .eq("id", user_id)
                .limit(1)
                .execute()
            )
        except (APIError, httpx.HTTPError) as exc:
            if isinstance(exc, APIError) and exc.code == INVALID_TEXT_REPRESENTATION:
                # Not a UUID (the contract allows test users like that): it has no users row.
                rows: list[Any] = []
            else:
                # No check, no call: a short Supabase outage costs a retry, not money.
                raise RetryableJobError(
                    f"Could not check the AI budget (Supabase: {_describe(exc)})"
                ) from exc
        else:
            rows = list(response.data or [])
        if not rows:
            log.warning("Budget: no users row for {}; counting spend as 0", user_id)
            return 0.0
        row = rows[0]
        return cost_usd(int(row.get("input_tokens") or 0), int(row.get("output_tokens") or 0))

    async def reserve(
        self,
        redis: Redis,
        user_id: str,
        estimate: TokenEstimate,
        log: JobLogger | Logger = _default_logger,
    ) -> Reservation:
        """Hold the estimate against the user's monthly allowance, or raise OverBudget."""
        if self.client is None:
            return Reservation(redis, "", "", "")
        month = datetime.now(UTC).strftime("%Y-%m")
        # A cluster: both in one slot, for the script and the settling transaction (worker.keys).
        cluster = is_cluster(redis)
        reserved = budget_key(self.key_prefix, user_id, month, "reserved", cluster)
        settled = budget_key(self.key_prefix, user_id, month, "settled", cluster)
        before = int(await redis.get(settled) or 0)
        spent = await self.spent_usd(user_id, log)
        cost = micro_usd(estimate.cost_usd)
        member = f"{uuid.uuid4().hex}:{cost}"
        args = [micro_usd(spent), before, cost, micro_usd(self.monthly_budget_usd),
                RESERVATION_LEASE_S * 1000, member, MONTH_KEYS_TTL_S * 1000]  # fmt: skip
        ok, committed = await _RESERVE(redis, [reserved, settled], args)
        log.info(
            "Budget: spent ${:.4f} (+${:.4f} held or just settled by other calls) + estimated"
            " ${:.4f} ({} in / {} out tokens) of ${:.2f}",
            spent,
            max(int(committed) - micro_usd(spent), 0) / MICRO,
            estimate.cost_usd,
            estimate.input_tokens,
            estimate.output_tokens,
            self.monthly_budget_usd,
        )
        if not ok:
            raise OverBudget()
        return Reservation(redis, reserved, settled, member)

    @asynccontextmanager
    async def hold(
        self,
        redis: Redis,
        user_id: str,
        estimate: TokenEstimate,
        log: JobLogger | Logger = _default_logger,
    ) -> AsyncIterator[Reservation]:
        """`reserve`, and release the hold when the block ends unless it was settled."""
        reservation = await self.reserve(redis, user_id, estimate, log)
        try:
            yield reservation
        finally:
            await reservation.release()

    async def record(
        self,
        user_id: str,
        input_tokens: int,
        output_tokens: int,
        log: JobLogger | Logger = _default_logger,
    ) -> bool:
        """Call `increment_tokens(user_id, input_count, output_count)`; False on failure."""
        if self.client is None or (input_tokens <= 0 and output_tokens <= 0):
            return False
        # Sent as JSON, ints as ints; postgrest annotates `params` as dict[str, str].
        args: dict[str, Any] = {
            "user_id": user_id,
            "input_count": input_tokens,
            "output_count": output_tokens,
        }
        try:
            await self.client.rpc("increment_tokens", args).execute()
        except Exception as exc:
            log.warning(
                "Token accounting failed for {} ({} in / {} out): {}",
                user_id,
                input_tokens,
                output_tokens,
                _describe(exc),
            )
            return False
        return True

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def micro_usd(usd: float) -> int:
    return math.ceil(usd * MICRO)


class Reservation:
    """A hold on part of a user's allowance: `settle` once the call's tokens are recorded,
    `release` when no call was billed (a no-op once settled, and for a disabled budget)."""

    def __init__(self, redis: Redis, reserved: str, settled: str, member: str) -> None:
        self.redis = redis
        self.reserved = reserved
        self.settled = settled
        self.member = member

    async def settle(self, input_tokens: int, output_tokens: int) -> None:
        if not self.member:
            return
        member, self.member = self.member, ""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.reserved, member)
            pipe.incrby(self.settled, micro_usd(cost_usd(input_tokens, output_tokens)))
            pipe.expire(self.settled, MONTH_KEYS_TTL_S)
            await pipe.execute()

    async def release(self) -> None:
        if self.member:
            member, self.member = self.member, ""
            await self.redis.zrem(self.reserved, member)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        parts = [p for p in (exc.code, exc.message) if p]
        return " ".join(str(p) for p in parts) or "API error"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
