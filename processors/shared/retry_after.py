"""The wait an HTTP 429 asks for: its Retry-After header in seconds, else the caller's default.

Only the delta-seconds form is read (what AWS and Azure send); anything else, or no header,
gives the provider's own default. OpenAI's richer headers have their own reader
(processors.shared.openai_client.retry_after_s).
"""

from __future__ import annotations

from collections.abc import Mapping


def retry_after_s(headers: Mapping[str, str], default_s: float) -> float:
    """Retry-After in seconds (never negative), or `default_s` when absent or unreadable.

    Looked up as sent and lower-cased: botocore's headers are a plain dict of lower-cased
    names, aiohttp's and Azure's are case-insensitive."""
    value = headers.get("Retry-After") or headers.get("retry-after") or ""
    try:
        return max(float(value), 0.0)
    except ValueError:
        return default_s
