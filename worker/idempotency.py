"""The web service's idempotency key (INTEROP §3), computed the way Node computes it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Fields in the order the web service writes them; `targetLanguage` is deliberately absent.
KEY_FIELDS = ("userId", "content", "subject", "topic", "nativeLanguage")
CONTENT_UNITS = 1000  # content.slice(0, 1000): UTF-16 code units, not code points


def js_slice(text: str, units: int) -> str:
    """`text.slice(0, units)` in JavaScript: counts UTF-16 code units (an emoji is 2)."""
    encoded = text.encode("utf-16-le", "surrogatepass")[: units * 2]
    return encoded.decode("utf-16-le", "surrogatepass")


def js_stringify(value: Any) -> str:
    """`JSON.stringify` for plain JSON values: compact, raw non-ASCII, lone surrogates escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "".join(f"\\u{ord(ch):04x}" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


def idempotency_key(job_type: str, payload: Mapping[str, Any]) -> str:
    obj: dict[str, Any] = {"jobType": job_type}
    for field in KEY_FIELDS:
        value = payload.get(field)
        if value is None:  # JSON.stringify drops undefined
            continue
        obj[field] = js_slice(value, CONTENT_UNITS) if field == "content" else value
    digest = hashlib.sha256(js_stringify(obj).encode("utf-8", "surrogatepass")).hexdigest()
    return f"idempotency:{job_type}:{digest}"
