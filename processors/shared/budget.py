"""The monthly AI budget per user and token accounting, kept in Supabase (INTEROP §5).

`Budget.check` runs before an OpenAI call and raises `OverBudget` (permanent) when the user's
spend so far plus the estimate for this call would exceed the allowance. `Budget.record` adds
the tokens a call used through the `increment_tokens` RPC; its failures are logged, never
fatal. Without Supabase both are no-ops (`Budget.disabled()`), and `build` says so in its notes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from loguru import logger as _default_logger
from postgrest import APIError

from processors.shared.supabase_client import SupabaseSettings, make_client
from worker.errors import PermanentJobError, RetryableJobError

if TYPE_CHECKING:
    from loguru import Logger
    from postgrest import AsyncPostgrestClient

    from worker.joblog import JobLogger

INPUT_USD_PER_MTOK = 0.60
OUTPUT_USD_PER_MTOK = 2.40
MONTHLY_BUDGET_USD = 5.00
OUTPUT_PER_INPUT_TOKEN = 2.5
TOKENS_PER_MESSAGE_OVERHEAD = 4
CHARS_PER_TOKEN = 4
INVALID_TEXT_REPRESENTATION = "22P02"  # Postgres: e.g. `id=eq.<not a uuid>`

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
    ) -> None:
        self.client = client  # shared with processors that write rows (generate-lesson)
        self._http = http
        self.monthly_budget_usd = monthly_budget_usd
        self.notes = notes

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Budget:
        """ConfigError for half a Supabase configuration; disabled when there is none."""
        return cls.from_settings(SupabaseSettings.from_env(env))

    @classmethod
    def from_settings(cls, settings: SupabaseSettings | None) -> Budget:
        """Disabled when Supabase is not configured (None)."""
        if settings is None:
            return cls.disabled()
        client, http = make_client(settings)
        notes = (
            ()
            if settings.uses_service_role
            else (ANON_KEY_NOTE.format(variable=settings.key_variable),)
        )
        return cls(client, http, notes=notes)

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

    async def check(
        self, user_id: str, estimate: TokenEstimate, log: JobLogger | Logger = _default_logger
    ) -> None:
        """Raise OverBudget when spend so far + this estimate exceeds the monthly allowance."""
        if self.client is None:
            return
        spent = await self.spent_usd(user_id, log)
        projected = spent + estimate.cost_usd
        log.info(
            "Budget: spent ${:.4f} + estimated ${:.4f} ({} in / {} out tokens) of ${:.2f}",
            spent,
            estimate.cost_usd,
            estimate.input_tokens,
            estimate.output_tokens,
            self.monthly_budget_usd,
        )
        if projected > self.monthly_budget_usd:
            raise OverBudget()

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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        parts = [p for p in (exc.code, exc.message) if p]
        return " ".join(str(p) for p in parts) or "API error"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
