"""The job contract: the JSON Schemas in contract/, loaded once and checked around every job."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from worker.errors import ContractViolation, InvalidPayload, UnknownJobType

Kind = Literal["payload", "result"]
KINDS: tuple[Kind, ...] = ("payload", "result")
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "contract"

# `$id` must name the job, the kind and the same version as `x-version`, so a schema copied
# into another job's folder, or bumped in one place only, fails at load rather than in review.
_ID = re.compile(
    r"^urn:ai-jobs:(?P<name>[a-z0-9-]+):(?P<kind>payload|result):v(?P<version>[1-9][0-9]*)$"
)

# Patterns whose meaning a reader of a failed job should see instead of the regex itself.
# "Not blank": a character outside JavaScript's `\s`, listed one by one because `\S` means
# different characters to ajv (ECMAScript) and to Python's `re` (U+FEFF; U+001C-U+001F, U+0085).
NOT_BLANK = (
    r"[^\t\n\u000b\f\r \u00a0\u1680\u2000-\u200a"
    r"\u2028\u2029\u202f\u205f\u3000\ufeff]"
)
_PATTERN_MEANING = {r"\S": "must not be blank", NOT_BLANK: "must not be blank"}


class Contract:
    """Every job type's payload and result schema, with a validator built for each at load.

    Format checking is off, as in the Node package (ajv without ajv-formats): the schemas
    use no `format`, and a format keyword must never reject on one side and pass on the other.
    """

    def __init__(self, root: Path, schemas: dict[tuple[str, Kind], dict[str, Any]]) -> None:
        self.root = root
        self._schemas = schemas
        self._validators = {key: Draft202012Validator(schema) for key, schema in schemas.items()}

    @classmethod
    def load(cls, root: Path | None = None) -> Contract:
        """Read `<root>/<job-name>/{payload,result}.schema.json`; fail now on a malformed schema."""
        root = (root or DEFAULT_ROOT).resolve()
        schemas: dict[tuple[str, Kind], dict[str, Any]] = {}
        for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            files = {kind: job_dir / f"{kind}.schema.json" for kind in KINDS}
            present = [kind for kind, path in files.items() if path.is_file()]
            if not present:
                continue  # not a job folder (e.g. node/)
            for kind in KINDS:
                if kind not in present:
                    raise ValueError(f"{files[kind]}: missing; a job type needs both schemas")
                schemas[(job_dir.name, kind)] = load_schema(files[kind], job_dir.name, kind)
        if not schemas:
            raise ValueError(f"{root}: no job schemas found")
        return cls(root, schemas)

    def job_names(self) -> list[str]:
        return sorted({name for name, _ in self._schemas})

    def has(self, name: str) -> bool:
        return (name, "payload") in self._schemas

    def version(self, name: str, kind: Kind) -> int:
        version: int = self._get(name, kind)["x-version"]
        return version

    def schema(self, name: str, kind: Kind) -> dict[str, Any]:
        """A copy, so a caller deriving e.g. an OpenAI schema from it cannot alter validation."""
        return copy.deepcopy(self._get(name, kind))

    def validate_payload(self, name: str, data: Any) -> None:
        if (error := self._first_error(name, "payload", data)) is not None:
            raise InvalidPayload(name, *describe(error))

    def validate_result(self, name: str, value: Any) -> None:
        if (error := self._first_error(name, "result", value)) is not None:
            raise ContractViolation(name, *describe(error))

    def _get(self, name: str, kind: Kind) -> dict[str, Any]:
        try:
            return self._schemas[(name, kind)]
        except KeyError:
            # No schema means no contract for the name: the same permanent failure as no processor.
            raise UnknownJobType(name) from None

    def _first_error(self, name: str, kind: Kind, instance: Any) -> ValidationError | None:
        self._get(name, kind)
        return best_match(self._validators[(name, kind)].iter_errors(instance))


def load_schema(path: Path, name: str, kind: Kind) -> dict[str, Any]:
    """Read one schema file and check it is draft 2020-12 and carries a consistent version."""
    schema = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a schema must be a JSON object")
    Draft202012Validator.check_schema(schema)
    match = _ID.match(str(schema.get("$id", "")))
    version = schema.get("x-version")
    if match is None or (match["name"], match["kind"]) != (name, kind):
        raise ValueError(f"{path}: $id must be urn:ai-jobs:{name}:{kind}:v<version>")
    if type(version) is not int or int(match["version"]) != version:
        raise ValueError(f"{path}: x-version must be an integer equal to the v<N> of $id")
    return schema


def describe(error: ValidationError) -> tuple[str, str]:
    """(field path, short sentence) for an error, e.g. ("flashcards/3/front", "is required")."""
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        # jsonschema reports a missing property at its parent; name the property itself.
        parts.append(_missing_property(error))
        return _pointer(parts), "is required"
    return _pointer(parts), _problem(error)


def _missing_property(error: ValidationError) -> str:
    missing = [p for p in error.validator_value if p not in error.instance]
    # One error is raised per missing property; its message is the only place naming which.
    for prop in missing:
        if error.message == f"{prop!r} is a required property":
            return str(prop)
    return str(missing[0]) if missing else ""


def _pointer(parts: list[str]) -> str:
    # RFC 6901 escaping, minus the leading slash: the Node package turns ajv's paths into the same.
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _problem(error: ValidationError) -> str:
    keyword, expected = error.validator, error.validator_value
    if keyword == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return f"expected {wanted}, got {json_type(error.instance)}"
    if keyword == "minLength":
        return "must not be empty" if expected == 1 else f"must be at least {expected} characters"
    if keyword == "pattern":
        return _PATTERN_MEANING.get(expected, f"must match pattern {expected}")
    if keyword == "enum":
        return "must be one of " + ", ".join(str(v) for v in expected)
    if keyword == "const":
        return f"must be {json.dumps(expected)}"
    if keyword == "minimum":
        return f"must be >= {expected}"
    if keyword == "maximum":
        return f"must be <= {expected}"
    return str(error.message)


def json_type(value: Any) -> str:
    """The JSON Schema type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
