"""The web service's idempotency key (INTEROP §3), computed the way Node computes it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from worker.results import node_json

# Fields in the order the web service writes them; `targetLanguage` is deliberately absent.
KEY_FIELDS = ("userId", "content", "subject", "topic", "nativeLanguage")
CONTENT_UNITS = 1000  # content.slice(0, 1000): UTF-16 code units, not code points


def js_slice(text: str, units: int) -> str:
    """`text.slice(0, units)` in JavaScript: counts UTF-16 code units (an emoji is 2)."""
    encoded = text.encode("utf-16-le", "surrogatepass")[: units * 2]
    return encoded.decode("utf-16-le", "surrogatepass")


def idempotency_key(job_type: str, payload: Mapping[str, Any]) -> str:
    obj: dict[str, Any] = {"jobType": job_type}
    for field in KEY_FIELDS:
        value = payload.get(field)
        if value is None:  # JSON.stringify drops undefined
            continue
        obj[field] = js_slice(value, CONTENT_UNITS) if field == "content" else value
    digest = hashlib.sha256(node_json(obj).encode("utf-8")).hexdigest()
    return f"idempotency:{job_type}:{digest}"
