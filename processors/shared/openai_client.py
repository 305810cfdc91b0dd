"""OpenAI for processors: settings, one AsyncOpenAI client, a strict JSON call, and error mapping.

How an OpenAI failure maps onto the worker's classes (`classify_openai_error`):

    HTTP 400/401/403/404/422, other 4xx   → PermanentJobError  (the same request fails again)
    429 insufficient_quota                → PermanentJobError  (no credit: waiting won't help)
    429 "Request too large" (tokens)      → PermanentJobError  (over the TPM limit on its own)
    429 rate limit                        → RateLimited(retry_after_s from the headers)
    408, 409, 5xx, timeout, connection    → RetryableJobError  (BullMQ backoff)

and what a reply that arrived but is unusable becomes (`JsonReply.parsed`):

    refusal                               → ReplyRefused  (permanent)
    finish_reason "content_filter"        → ReplyFiltered (permanent)
    finish_reason "length"                → ReplyCutOff   (permanent)
    not JSON / no choices                 → RetryableJobError

BullMQ's attempts are the only retry loop, so the SDK's own retries are off (`SDK_MAX_RETRIES`):
an SDK retry would hide a second billed call inside one attempt and would sit out a
`Retry-After` while holding a worker slot, instead of parking the job. With a `permit` (from
`worker.providers`), each outcome also feeds OpenAI's shared breaker and 429 cooldown.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import openai
from openai import AsyncOpenAI, omit

from worker.errors import (
    ConfigProblems,
    JobError,
    PermanentJobError,
    RateLimited,
    RetryableJobError,
)
from worker.providers import Permit
from worker.results import well_formed

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam
    from openai.types.shared_params import ResponseFormatJSONSchema

API_KEY_VARIABLES = ("EXPO_PUBLIC_OPENAI_API_KEY", "OPENAI_API_KEY")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 60.0
SDK_MAX_RETRIES = 0

# A 429 without usable headers waits this long; any wait is kept within the bounds (the
# dispatcher clamps to the same range), so a bogus header can neither hammer nor park the queue.
RATE_LIMIT_DEFAULT_S = 10.0
RATE_LIMIT_MIN_S = 1.0
RATE_LIMIT_MAX_S = 300.0

# OpenAI's own message is shown after ours when useful; keep failedReason readable.
_MAX_UPSTREAM_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class OpenAISettings:
    api_key: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    timeout_s: float = DEFAULT_TIMEOUT_S
    api_key_variable: str = "OPENAI_API_KEY"  # which variable held the key, for start-up lines

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OpenAISettings:
        """The key, `OPENAI_BASE_URL`, `OPENAI_MODEL`, `OPENAI_TIMEOUT_S`; ConfigError names
        each that is missing or malformed."""
        problems = ConfigProblems()
        api_key, key_variable = "", ""
        for name in API_KEY_VARIABLES:
            if value := env.get(name, "").strip():
                api_key, key_variable = value, name
                break
        if not api_key:
            problems.add(
                API_KEY_VARIABLES[-1], f"no OpenAI API key: set {' or '.join(API_KEY_VARIABLES)}"
            )
        base_url = env.get("OPENAI_BASE_URL", "").strip() or DEFAULT_BASE_URL
        if not re.match(r"^https?://\S+$", base_url):
            problems.add("OPENAI_BASE_URL", f"must be an http(s) URL, got {base_url!r}")
        model = env.get("OPENAI_MODEL", "").strip() or DEFAULT_MODEL
        raw_timeout = env.get("OPENAI_TIMEOUT_S", "").strip()
        timeout_s = DEFAULT_TIMEOUT_S
        if raw_timeout:
            try:
                timeout_s = float(raw_timeout)
            except ValueError:
                timeout_s = math.nan
            if not (math.isfinite(timeout_s) and timeout_s > 0):
                problems.add(
                    "OPENAI_TIMEOUT_S", f"must be a positive number of seconds, got {raw_timeout!r}"
                )
        problems.raise_any()
        return cls(api_key, base_url, model, timeout_s, key_variable)


def make_client(settings: OpenAISettings) -> AsyncOpenAI:
    # base_url is always passed so the SDK never falls back to reading os.environ itself.
    return AsyncOpenAI(
        api_key=settings.api_key,
        base_url=settings.base_url,
        timeout=settings.timeout_s,
        max_retries=SDK_MAX_RETRIES,
    )


# --- the call ------------------------------------------------------------------------------


class ReplyRefused(PermanentJobError):
    """The model declined (`message.refusal`); the same input gets the same answer."""

    def __init__(self, refusal: str) -> None:
        super().__init__(
            "The AI declined to process this content"
            + (f": {_shorten(refusal)}" if refusal.strip() else ".")
        )
        self.refusal = refusal


class ReplyFiltered(PermanentJobError):
    """OpenAI's content filter stopped the reply."""

    def __init__(self) -> None:
        super().__init__("The AI provider's content filter blocked the reply for this content.")


class ReplyCutOff(PermanentJobError):
    """The reply hit the output-token limit, so the JSON is incomplete.

    Permanent, not retried: at a low temperature the same input runs into the same limit
    again, and each retry bills the full output once more.
    """

    def __init__(self, max_completion_tokens: int | None) -> None:
        limit = f" of {max_completion_tokens} tokens" if max_completion_tokens else ""
        super().__init__(
            f"The AI reply was cut off at the output limit{limit} before it was complete. "
            "Please try again with shorter content."
        )
        self.max_completion_tokens = max_completion_tokens


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from OpenAI's prompt cache


@dataclass(frozen=True)
class JsonReply:
    """A completion that came back (HTTP 200). Read `usage` first, then `parsed()`."""

    completion: Any  # openai.types.chat.ChatCompletion
    usage: Usage
    max_completion_tokens: int | None = None

    @property
    def finish_reason(self) -> str | None:
        choices = self.completion.choices or []
        return choices[0].finish_reason if choices else None

    def parsed(self) -> dict[str, Any]:
        """The JSON object the model produced, or the error class that says why there is none."""
        if not self.completion.choices:
            raise RetryableJobError("OpenAI returned a reply without choices")
        choice = self.completion.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            raise ReplyRefused(message.refusal)
        if choice.finish_reason == "content_filter":
            raise ReplyFiltered()
        if choice.finish_reason == "length":
            raise ReplyCutOff(self.max_completion_tokens)
        try:
            data = json.loads(message.content or "")
        except ValueError:
            raise RetryableJobError("OpenAI returned a reply that is not valid JSON") from None
        if not isinstance(data, dict):
            raise RetryableJobError("OpenAI returned JSON that is not an object")
        return data


def json_schema_format(name: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The `response_format` for strict structured output (the schema must already be strict)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "strict": True, "schema": dict(schema)},
    }


async def complete_json(
    client: AsyncOpenAI,
    *,
    model: str,
    messages: Sequence[Mapping[str, str]],
    schema_name: str,
    schema: Mapping[str, Any],
    temperature: float,
    max_completion_tokens: int | None = None,
    prompt_cache_key: str | None = None,
    permit: Permit | None = None,
) -> JsonReply:
    """One chat completion with strict structured output; OpenAI errors arrive as worker classes.

    `prompt_cache_key` groups requests that share a long stable prefix, so OpenAI's prompt
    cache is more likely to serve it. `permit`: the provider's admission of this call, told
    how it ended (a fault that leaves the breaker open comes back as Deferred).
    """
    try:
        completion = await client.chat.completions.create(
            model=model,
            # A lone surrogate (valid in the payload's JSON) is no valid Unicode to send.
            messages=cast(
                "list[ChatCompletionMessageParam]",
                [{k: well_formed(v) for k, v in m.items()} for m in messages],
            ),
            temperature=temperature,
            response_format=cast(
                "ResponseFormatJSONSchema", json_schema_format(schema_name, schema)
            ),
            max_completion_tokens=omit if max_completion_tokens is None else max_completion_tokens,
            prompt_cache_key=prompt_cache_key or omit,
        )
    except openai.OpenAIError as exc:
        error = classify_openai_error(exc)
        raise (error if permit is None else await permit.failed(error)) from exc
    if permit is not None:
        await permit.succeeded()
    return JsonReply(completion, usage_of(completion), max_completion_tokens)


def usage_of(completion: Any) -> Usage:
    usage = getattr(completion, "usage", None)
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    return Usage(
        prompt_tokens=int(usage.prompt_tokens or 0),
        completion_tokens=int(usage.completion_tokens or 0),
        total_tokens=int(usage.total_tokens or 0),
        cached_tokens=int(getattr(details, "cached_tokens", None) or 0),
    )


# --- error classification ------------------------------------------------------------------


def classify_openai_error(exc: BaseException) -> JobError:
    """Map an `openai` exception onto PermanentJobError / RateLimited / RetryableJobError."""
    if isinstance(exc, openai.APITimeoutError):
        return RetryableJobError("OpenAI request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return RetryableJobError("Could not reach OpenAI (connection error)")
    if isinstance(exc, openai.LengthFinishReasonError):
        return ReplyCutOff(None)
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return ReplyFiltered()
    if isinstance(exc, openai.APIStatusError):
        return _classify_status(exc)
    return RetryableJobError(f"OpenAI call failed: {type(exc).__name__}: {_shorten(str(exc))}")


def _classify_status(exc: openai.APIStatusError) -> JobError:
    status = exc.status_code
    code = exc.code or ""
    kind = exc.type or ""
    upstream = _upstream_message(exc)
    tag = f"{status} {code}".strip()
    if status == 429:
        if code == "insufficient_quota" or kind == "insufficient_quota":
            return PermanentJobError(
                "The AI service is unavailable: the worker's OpenAI account has run out of quota "
                "(429 insufficient_quota). Please try again later."
            )
        if upstream.lower().startswith("request too large"):
            # Bigger than the tokens-per-minute limit on its own: waiting never makes it fit.
            return PermanentJobError(
                "This content is too large for the AI service's rate limit. "
                f"Please try with shorter content. ({tag}: {upstream})"
            )
        wait_s = retry_after_s(exc.response.headers, limit_type=kind)
        return RateLimited(wait_s, f"OpenAI rate limit reached ({tag})", provider="openai")
    if status == 400 and code == "context_length_exceeded":
        return PermanentJobError(
            "This content is too long for the AI model. Please try with shorter content."
        )
    if status == 401:
        # OpenAI's message echoes part of the key; it never goes into failedReason.
        return PermanentJobError(
            f"The AI service rejected the worker's credentials ({tag}). "
            f"Check {' / '.join(API_KEY_VARIABLES)}."
        )
    if status in (408, 409) or status >= 500:
        return RetryableJobError(f"OpenAI is temporarily unavailable ({tag}): {upstream}")
    return PermanentJobError(f"The AI service rejected the request ({tag}): {upstream}")


def _upstream_message(exc: openai.APIStatusError) -> str:
    """OpenAI's own `error.message` (the SDK keeps the `error` object as `body`)."""
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        return _shorten(message) if isinstance(message, str) else ""
    return _shorten(str(body or ""))


def retry_after_s(headers: Mapping[str, str], *, limit_type: str = "") -> float:
    """Seconds to pause for a 429, from `retry-after-ms`, `retry-after` (seconds or HTTP date),
    else `x-ratelimit-reset-requests`/`-tokens` (`6m0s`, `20ms`), else the default; clamped."""
    wait = _header_seconds(headers)
    if wait is None:
        resets = {
            "requests": _duration_s(headers.get("x-ratelimit-reset-requests")),
            "tokens": _duration_s(headers.get("x-ratelimit-reset-tokens")),
        }
        wait = resets.get(limit_type)
        if wait is None:
            known = [v for v in resets.values() if v is not None]
            wait = max(known) if known else None
    if wait is None:
        wait = RATE_LIMIT_DEFAULT_S
    if math.isnan(wait):
        wait = RATE_LIMIT_DEFAULT_S
    return min(max(wait, RATE_LIMIT_MIN_S), RATE_LIMIT_MAX_S)


def _header_seconds(headers: Mapping[str, str]) -> float | None:
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value.strip()) / divisor
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return float(email.utils.mktime_tz(parsed) - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration_s(value: str | None) -> float | None:
    """Parse OpenAI's reset durations such as `1s`, `6m0s`, `20ms`, `1h2m3.5s`."""
    if not value:
        return None
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        try:
            return float(text)  # a bare number: seconds
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= _MAX_UPSTREAM_MESSAGE_CHARS:
        return text
    return text[: _MAX_UPSTREAM_MESSAGE_CHARS - 1] + "…"
