"""JSON as Node writes it: results made JSON-safe, then encoded like `JSON.stringify`."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from worker.errors import PermanentJobError

# Node's numbers are doubles: larger integers would silently change on JSON.parse.
MAX_SAFE_INTEGER = 2**53 - 1


class UnsafeResult(PermanentJobError):
    """The processor returned something JSON cannot carry faithfully: a bug, so no retry."""


def to_json_safe(value: Any, path: str = "") -> Any:
    """Return a JSON-safe copy, converting what has one obvious JSON form.

    datetime/date → ISO 8601 (UTC `Z` like Node's toISOString when aware), Decimal → number,
    UUID/Enum → their value, tuple/set → list, dataclass/pydantic → object, bytes → base64.
    NaN/Infinity and integers beyond 2^53 have no faithful form and fail the job at once.
    """
    where = path or "(result)"
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise UnsafeResult(
                f"result {where}: integer {value} is beyond 2^53 and would change in Node"
            )
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise UnsafeResult(f"result {where}: {value} is not a JSON number")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnsafeResult(f"result {where}: object key {key!r} is not a string")
            out[key] = to_json_safe(item, f"{path}/{key}" if path else key)
        return out
    if isinstance(value, (list, tuple)):
        return [
            to_json_safe(item, f"{path}/{i}" if path else str(i)) for i, item in enumerate(value)
        ]
    if isinstance(value, (set, frozenset)):
        return [to_json_safe(item, f"{path}/*") for item in sorted(value, key=repr)]
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
            return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return to_json_safe(float(value), path)
    if isinstance(value, (uuid.UUID,)):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value, path)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_safe(dataclasses.asdict(value), path)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return to_json_safe(model_dump(mode="json"), path)
    raise UnsafeResult(f"result {where}: a {type(value).__name__} is not JSON")


def node_json(value: Any) -> str:
    """Encode like Node's `JSON.stringify`: compact, key order kept, non-ASCII raw (UTF-8), and a
    lone UTF-16 surrogate (valid JSON, e.g. `"a\\udc00b"`) escaped as `\\udc00`, as ES2019's
    well-formed JSON.stringify writes it: raw, it could not be encoded to UTF-8 at all."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATES.sub(_js_escape, text)


def well_formed(text: str) -> str:
    """`String.prototype.toWellFormed()`: each lone surrogate becomes U+FFFD (what Node's UTF-8
    encoder writes for one), a high + low pair becomes its character. For text sent out."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATES = re.compile("[\ud800-\udbff][\udc00-\udfff]|[\ud800-\udfff]")


def _js_escape(match: re.Match[str]) -> str:
    found = match.group()
    if len(found) == 2:  # a pair: one character, written raw as JSON.stringify does
        return found.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    return f"\\u{ord(found):04x}"
