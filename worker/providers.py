"""Protection for calls to an AI provider, shared by every replica through Redis: a circuit
breaker and a rate limit per provider, each one Lua script (one atomic step per decision).

    async with provider.call(ctx.redis, tokens=estimate) as permit:   # Deferred: not now
        reply = await the_call()        # then permit.succeeded() / await permit.failed(error)

- **Breaker** (INTEROP §8 keys, read by the web service's status, alerts and reset routes):
  `circuit:<name>:state` CLOSED | OPEN | HALF_OPEN (missing = CLOSED), `failures` (in a row,
  expiring after the window), `successes` (probes that passed while HALF_OPEN), `opened_at`
  (ms epoch). Only upstream faults count (5xx, timeouts, connection errors: the
  RetryableJobError a call's classification gives); a 4xx or a 429 says the provider is up, and
  a budget refusal or a validation failure never reaches it. OPEN: no call; the job is parked
  until `opened_at + open_s` without using an attempt. Then HALF_OPEN lets exactly one call
  through across all replicas (a lease, `circuit:<name>:probe`, that expires should its holder
  die); `successes` probes in a row close it, a failed one opens it again. A fault that leaves
  the breaker open (the one that opened it, a failed probe) parks its job instead of using an
  attempt: the provider is at fault, not the job.
- **Rate limit**: requests and tokens per window (`<NAME>_RPM`, `<NAME>_TPM`, per minute
  unless `<NAME>_RATE_WINDOW_S` says otherwise), per provider and model, as GCRA with no
  burst: calls are spaced `window / limit` apart, so no window of that length ever holds more
  than the limit (tokens: more by at most one call's estimate, charged up front). A call that
  would wait up to MAX_HOLD_S waits in its slot; a longer wait parks the job. A 429 sets
  `cooldown`: every replica parks that provider's jobs until the Retry-After has passed (those
  waits count towards WORKER_RATE_LIMIT_MAX_WAIT_S), and their parks' jitter lets the first
  one back find out alone whether it has lifted.

Providers: `openai` now; `azure-vision`, `azure-speech`, `polly` reserved, with the Node
worker's thresholds where it had them (INTEROP §8). Settings per provider, prefix the name in
capitals with `-` as `_` (OPENAI_, AZURE_SPEECH_, ...): `_BREAKER_FAILURES`,
`_BREAKER_SUCCESSES`, `_BREAKER_OPEN_S`, `_BREAKER_WINDOW_S`, `_RPM`, `_TPM`,
`_RATE_WINDOW_S`. PROTECTION_KEY_PREFIX (empty in production) keeps tests apart on one Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from worker.errors import Deferred, JobError, RateLimited, RetryableJobError
from worker.keys import beside, circuit_key, rate_key
from worker.settings import _Reader

if TYPE_CHECKING:
    from redis.asyncio import Redis

OPENAI = "openai"
AZURE_VISION = "azure-vision"
AZURE_SPEECH = "azure-speech"
POLLY = "polly"
# name -> (failures to open, successes to close, seconds open): INTEROP §8 where Node had them.
BREAKER_DEFAULTS: dict[str, tuple[int, int, float]] = {
    OPENAI: (5, 2, 60.0),
    AZURE_VISION: (5, 2, 60.0),
    AZURE_SPEECH: (8, 3, 30.0),
    POLLY: (10, 3, 30.0),
}
FAILURE_WINDOW_S = 60.0  # `failures` expires this long after the last one (Node: 60 s TTL)
RATE_WINDOW_S = 60.0
# Longest a call waits for its rate-limit slot while holding a job slot; longer: parked.
MAX_HOLD_S = 2.0
# The probe's lease: longer than any call (the SDK's timeout), shorter than a stuck HALF_OPEN.
PROBE_LEASE_S = 120.0
# While the probe is in flight, other jobs look again after this long (or when its lease ends).
PROBE_BUSY_S = 2.0
KEY_PREFIX_VARIABLE = "PROTECTION_KEY_PREFIX"

CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"
_STATES = (CLOSED, OPEN, HALF_OPEN)  # the scripts answer the index

# KEYS state failures successes opened_at probe [version]; ARGV op, failures to open,
# successes to close, open ms, failure window ms, probe lease ms, probe busy ms, token
# [, "1": copied, on a cluster]. Answers {admitted (0 no, 1 yes, 2 as the probe), wait ms,
# state index}; copied, when a counter changed, also {version, failures, failures' ms to live,
# successes, opened_at} for `Provider._copy_counters` ("" for a missing key).
BREAKER_LUA = """
local state_key, failures_key, successes_key, opened_key, probe_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op = ARGV[1]
local open_ms = tonumber(ARGV[4])
local token = ARGV[8]
local copied = ARGV[9] == "1"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call("GET", state_key)
if state ~= "OPEN" and state ~= "HALF_OPEN" then state = "CLOSED" end
local changed = false  -- failures, successes or opened_at: the copies the web reads are due

local function reply(admitted, wait, index)
  if not (copied and changed) then return {admitted, wait, index} end
  local version = math.max((tonumber(redis.call("GET", KEYS[6]) or "") or 0) + 1, now)
  version = string.format("%.0f", version)
  redis.call("SET", KEYS[6], version)
  return {admitted, wait, index, version, redis.call("GET", failures_key) or "",
          redis.call("PTTL", failures_key), redis.call("GET", successes_key) or "",
          redis.call("GET", opened_key) or ""}
end
-- Copied: only our CLOSE clears opened_at, in this same step. CLOSED (or no state) while it is
-- set means another hand closed it, the web service's reset route: start afresh.
if copied and state == "CLOSED" and redis.call("EXISTS", opened_key) == 1 then
  redis.call("DEL", failures_key, successes_key, opened_key, probe_key)
  changed = true
end

local function open_left()
  local opened = tonumber(redis.call("GET", opened_key) or "") or 0
  return math.max(opened + open_ms - now, 0)
end
local function trip()
  redis.call("SET", state_key, "OPEN")
  redis.call("SET", opened_key, tostring(now))
  redis.call("DEL", successes_key, probe_key)
  changed = true
  return reply(0, open_ms, 1)
end
local function release()
  if redis.call("GET", probe_key) == token then redis.call("DEL", probe_key) end
end

if op == "acquire" then
  if state == "OPEN" then
    local left = open_left()
    if left > 0 then return reply(0, left, 1) end
    redis.call("SET", state_key, "HALF_OPEN")
    if redis.call("DEL", successes_key) > 0 then changed = true end
    state = "HALF_OPEN"
  end
  if state == "HALF_OPEN" then
    if redis.call("SET", probe_key, token, "NX", "PX", ARGV[6]) then return reply(2, 0, 2) end
    local left = redis.call("PTTL", probe_key)
    local busy = tonumber(ARGV[7])
    if left < 0 or left > busy then left = busy end
    return reply(0, left, 2)
  end
  return reply(1, 0, 0)
elseif op == "failure" then
  if state == "OPEN" then return reply(0, open_left(), 1) end  -- let through before it opened
  if state == "HALF_OPEN" then return trip() end
  local failures = redis.call("INCR", failures_key)
  redis.call("PEXPIRE", failures_key, ARGV[5])
  changed = true
  if failures >= tonumber(ARGV[2]) then return trip() end
  return reply(1, 0, 0)
elseif op == "success" then
  if state == "HALF_OPEN" then
    release()
    changed = true
    if redis.call("INCR", successes_key) >= tonumber(ARGV[3]) then
      redis.call("SET", state_key, "CLOSED")
      redis.call("DEL", failures_key, successes_key, opened_key)
      return reply(1, 0, 0)
    end
    return reply(1, 0, 2)
  end
  -- failures count in a row
  if state == "CLOSED" and redis.call("DEL", failures_key) > 0 then changed = true end
  return reply(1, 0, state == "OPEN" and 1 or 0)
end
release()  -- "release": the call was never made (cancelled, parked, refused before it)
return reply(1, 0, state == "OPEN" and 1 or (state == "HALF_OPEN" and 2 or 0))
"""

# KEYS a counter the web service reads, the version of the copy it holds (beside it); ARGV
# version, value ("" deletes it), ms to live (0: none). A copy never replaces a newer one, so
# copies that two replicas write in either order end at the newest.
COPY_LUA = """
if tonumber(ARGV[1]) <= (tonumber(redis.call("GET", KEYS[2]) or "") or 0) then return 0 end
redis.call("SET", KEYS[2], ARGV[1])
if ARGV[2] == "" then
  redis.call("DEL", KEYS[1])
elseif tonumber(ARGV[3]) > 0 then
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
else
  redis.call("SET", KEYS[1], ARGV[2])
end
return 1
"""

# KEYS requests tokens cooldown; ARGV op ("acquire" | "cooldown"), ms per request (0: no
# limit), ms per token (0: no limit), tokens, hold ms, cooldown ms.
# Answers {admitted (1) or not (0), wait ms, why: 0 none, 1 requests, 2 tokens, 3 cooldown}.
LIMITER_LUA = """
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cooldown = tonumber(redis.call("GET", KEYS[3]) or "") or 0
if ARGV[1] == "cooldown" then
  local ends = now + tonumber(ARGV[6])
  if ends > cooldown then
    redis.call("SET", KEYS[3], string.format("%.0f", ends), "PX", math.ceil(ARGV[6]))
    cooldown = ends
  end
  return {0, math.ceil(cooldown - now), 3}
end
-- Never waited out in a slot: every caller would call the moment it ends, a herd of 429s.
if cooldown > now then return {0, math.ceil(cooldown - now), 3} end
local per_request, per_token = tonumber(ARGV[2]), tonumber(ARGV[3])
local requests = tonumber(redis.call("GET", KEYS[1]) or "") or 0
local tokens = tonumber(redis.call("GET", KEYS[2]) or "") or 0
local wait, why = 0, 0
if per_request > 0 and requests - now > wait then wait, why = requests - now, 1 end
if per_token > 0 and tokens - now > wait then wait, why = tokens - now, 2 end
if wait > tonumber(ARGV[5]) then return {0, math.ceil(wait), why} end
local start = now + wait  -- the caller waits this long in its slot, then calls
local function advance(key, tat, cost)
  local next_tat = math.max(tat, start) + cost
  redis.call("SET", key, string.format("%.3f", next_tat), "PX", math.ceil(next_tat - now) + 1000)
end
if per_request > 0 then advance(KEYS[1], requests, per_request) end
if per_token > 0 then advance(KEYS[2], tokens, per_token * tonumber(ARGV[4])) end
return {1, math.ceil(wait), why}
"""


class Lua:
    """A script run by its SHA on whichever client the caller has (loaded once per server)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


_BREAKER = Lua(BREAKER_LUA)
_COPY = Lua(COPY_LUA)
_LIMITER = Lua(LIMITER_LUA)
# The counters the web service shows beside the state (INTEROP §8); on a cluster, copies.
SHOWN_COUNTERS = ("failures", "successes", "opened_at")


def is_cluster(redis: Redis) -> bool:
    """A Redis Cluster client: every script's keys must then share one slot."""
    return isinstance(redis, RedisCluster)


def key_prefix(env: Mapping[str, str]) -> str:
    """PROTECTION_KEY_PREFIX: empty in production (the web service reads `circuit:openai:*`)."""
    return env.get(KEY_PREFIX_VARIABLE, "").strip()


def env_prefix(name: str) -> str:
    return name.upper().replace("-", "_")


@dataclass(frozen=True)
class ProviderSettings:
    """One provider's breaker thresholds and rate limits (None: no limit)."""

    name: str
    failures_to_open: int
    successes_to_close: int
    open_s: float
    failure_window_s: float = FAILURE_WINDOW_S
    rpm: int | None = None
    tpm: int | None = None
    rate_window_s: float = RATE_WINDOW_S
    key_prefix: str = ""

    @classmethod
    def from_env(cls, name: str, env: Mapping[str, str]) -> ProviderSettings:
        """`<NAME>_BREAKER_*`, `<NAME>_RPM`, `<NAME>_TPM`, `<NAME>_RATE_WINDOW_S`; ConfigError
        names each malformed one."""
        failures, successes, open_s = BREAKER_DEFAULTS[name]
        reader = _Reader(env)
        p = env_prefix(name)
        settings = cls(
            name=name,
            failures_to_open=reader.integer(f"{p}_BREAKER_FAILURES", failures, low=1),
            successes_to_close=reader.integer(f"{p}_BREAKER_SUCCESSES", successes, low=1),
            open_s=reader.number(f"{p}_BREAKER_OPEN_S", open_s, low=0.1),
            failure_window_s=reader.number(f"{p}_BREAKER_WINDOW_S", FAILURE_WINDOW_S, low=0.1),
            rpm=reader.integer(f"{p}_RPM", None, low=1),
            tpm=reader.integer(f"{p}_TPM", None, low=1),
            rate_window_s=reader.number(f"{p}_RATE_WINDOW_S", RATE_WINDOW_S, low=0.1),
            key_prefix=key_prefix(env),
        )
        reader.problems.raise_any()
        return settings


class Provider:
    """The breaker and the rate limit of one provider (and model), over the caller's Redis."""

    def __init__(self, settings: ProviderSettings, model: str = "-") -> None:
        self.settings = settings
        self.name = settings.name
        self.model = model
        s, shared = settings, settings.key_prefix
        self.circuit_keys = [circuit_key(shared, self.name, field) for field in
                             ("state", "failures", "successes", "opened_at", "probe")]  # fmt: skip
        # A cluster: the counters and the probe beside the state key the web reads and resets,
        # and copies of the counters where the web reads them (`_copy_counters`).
        state = self.circuit_keys[0]
        self.cluster_circuit_keys = [state, *(beside(state, field) for field in
                                     (*SHOWN_COUNTERS, "probe", "version"))]  # fmt: skip
        self._copies = [(key, beside(key, "version"))
                        for key in self.circuit_keys[1:4]]  # fmt: skip
        rate_fields = ("requests", "tokens", "cooldown")
        self.rate_keys = [rate_key(shared, self.name, model, field) for field in rate_fields]
        self.cluster_rate_keys = [rate_key(shared, self.name, model, field, cluster=True)
                                  for field in rate_fields]  # fmt: skip
        window_ms = s.rate_window_s * 1000
        self._ms_per_request = window_ms / s.rpm if s.rpm else 0.0
        self._ms_per_token = window_ms / s.tpm if s.tpm else 0.0
        self._breaker_args = [s.failures_to_open, s.successes_to_close, round(s.open_s * 1000),
                              round(s.failure_window_s * 1000), round(PROBE_LEASE_S * 1000),
                              round(PROBE_BUSY_S * 1000)]  # fmt: skip

    @asynccontextmanager
    async def call(self, redis: Redis, tokens: int = 0) -> AsyncIterator[Permit]:
        """Admit one call (Deferred when not now); the permit is closed when the block ends."""
        permit = await self.admit(redis, tokens)
        try:
            yield permit
        finally:
            await permit.close()

    async def admit(self, redis: Redis, tokens: int = 0) -> Permit:
        token = uuid.uuid4().hex
        admitted, wait_ms, state = await self.breaker(redis, "acquire", token)
        if not admitted:
            why = "open" if state == OPEN else "half-open, its probe call in flight"
            message = f"{self.name} circuit breaker is {why}: the job waits" \
                      f" {wait_ms / 1000:.1f} s, no attempt used"  # fmt: skip
            raise Deferred(wait_ms / 1000, message, provider=self.name)
        permit = Permit(self, redis, token, probe=admitted == 2)
        try:
            ok, wait_ms, why_code = await self.limiter(redis, "acquire", tokens)
            if not ok:
                raise Deferred(wait_ms / 1000, self._limited(why_code, wait_ms),
                               provider=self.name, refused=why_code == 3)  # fmt: skip
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
        except BaseException:
            await permit.close()
            raise
        return permit

    def _limited(self, why: int, wait_ms: int) -> str:
        limit = {1: f"{self.settings.rpm} requests", 2: f"{self.settings.tpm} tokens"}.get(why)
        per = f" per {self.settings.rate_window_s:g} s"
        reason = f"its limit of {limit}{per}" if limit else "its 429 cooldown"
        return f"{self.name} ({self.model}) held back by {reason}: the job waits " \
               f"{wait_ms / 1000:.1f} s, no attempt used"  # fmt: skip

    async def breaker(self, redis: Redis, op: str, token: str = "") -> tuple[int, int, str]:
        """(admitted: 0/1/2 probe, wait ms, state) after one atomic step of the breaker."""
        if not is_cluster(redis):
            reply = await _BREAKER(redis, self.circuit_keys, [op, *self._breaker_args, token])
        else:
            args = [op, *self._breaker_args, token, 1]
            reply = await _BREAKER(redis, self.cluster_circuit_keys, args)
            if len(reply) > 3:
                await self._copy_counters(redis, reply[3:])
        return int(reply[0]), int(reply[1]), _STATES[int(reply[2])]

    async def _copy_counters(self, redis: Redis, snapshot: Sequence[Any]) -> None:
        """A cluster: write the counters the step left where the web service reads them. The
        decision is taken and stands; a copy that fails is said and mended by the next one."""
        version, failures, failures_ttl_ms, successes, opened_at = snapshot
        values = ((failures, max(int(failures_ttl_ms), 0)), (successes, 0), (opened_at, 0))
        copies = [_COPY(redis, keys, [version, value, ttl_ms])
                  for keys, (value, ttl_ms) in zip(self._copies, values, strict=True)]  # fmt: skip
        for result in await asyncio.gather(*copies, return_exceptions=True):
            if isinstance(result, RedisError | RedisClusterException | OSError):
                logger.warning(
                    "{} circuit breaker: its counters not copied for the web service ({}): {}",
                    self.name,
                    type(result).__name__,
                    result,
                )
            elif isinstance(result, BaseException):
                raise result

    async def limiter(
        self, redis: Redis, op: str, tokens: int = 0, cooldown_s: float = 0.0
    ) -> tuple[bool, int, int]:
        """(admitted, wait ms, why) after one atomic step of the rate limit."""
        args = [op, self._ms_per_request, self._ms_per_token, max(tokens, 0),
                round(MAX_HOLD_S * 1000), round(cooldown_s * 1000)]  # fmt: skip
        keys = self.cluster_rate_keys if is_cluster(redis) else self.rate_keys
        reply = await _LIMITER(redis, keys, args)
        return bool(reply[0]), int(reply[1]), int(reply[2])

    async def state(self, redis: Redis) -> str:
        value = await redis.get(self.circuit_keys[0])
        text = value.decode() if isinstance(value, bytes) else value
        return text if text in _STATES else CLOSED


class Permit:
    """One admitted call. Say how it ended: `succeeded()` (any answer that is not a fault) or
    `failed(error)`; an unsettled permit (the call never made, or cancelled) is released."""

    def __init__(self, provider: Provider, redis: Redis, token: str, probe: bool) -> None:
        self.provider = provider
        self.redis = redis
        self.token = token
        self.probe = probe  # the one call HALF_OPEN let through
        self._settled = False

    async def succeeded(self) -> None:
        await self._settle("success")

    async def failed(self, error: JobError) -> JobError:
        """Record what the call's error says about the provider; returns the error to raise."""
        if isinstance(error, RetryableJobError):  # a fault: 5xx, timeout, connection
            _, wait_ms, state = await self._settle("failure")
            if state == CLOSED:
                return error  # an attempt used; BullMQ's backoff
            name = self.provider.name
            return Deferred(wait_ms / 1000, f"{error}; the {name} circuit breaker is open: "
                            f"the job waits {wait_ms / 1000:.1f} s, no attempt used",
                            provider=name)  # fmt: skip
        if isinstance(error, RateLimited):
            await self.provider.limiter(self.redis, "cooldown", cooldown_s=error.retry_after_s)
        await self._settle("success")  # it answered: up, whatever it thought of the request
        return error

    async def close(self) -> None:
        if not self._settled:
            await self._settle("release")

    async def _settle(self, op: str) -> tuple[int, int, str]:
        self._settled = True
        return await self.provider.breaker(self.redis, op, self.token)
