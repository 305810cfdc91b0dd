"""A local server speaking Supabase's PostgREST API (`/rest/v1/...`) over in-memory tables.

It answers what the `postgrest` client sends: `GET /rest/v1/<table>?select=a,b&id=eq.<v>`
(filters `eq neq gt gte lt lte like ilike is in`, `order`, `limit`, `offset`, and
`Accept: application/vnd.pgrst.object+json` for `.single()`), `POST` inserts and upserts with
`Prefer: return=representation|minimal` and `resolution=merge|ignore-duplicates`, `PATCH` updates,
`DELETE`, and `POST /rest/v1/rpc/<fn>` with a JSON object of named arguments. An `id` is a
primary key: inserting one twice is 409 23505, as in Postgres. Errors use
PostgREST's body `{"code", "details", "hint", "message"}` and its status codes (PGRST116,
PGRST202, PGRST205, 22P02 for a malformed uuid, 42703 for an unknown column).

    async with FakePostgrest({"users": [{"id": UID, "input_tokens": 0, "output_tokens": 0}]}) as db:
        env = {"SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": db.api_key}
        ...
        assert db.rpc_calls("increment_tokens") == [{"user_id": UID, ...}]

`increment_tokens(user_id, input_count, output_count)` is built in (it adds to the `users`
row, as the real SQL function does, and returns nothing: 204); `functions` adds others.
`fail(...)` makes the next matching request(s) fail with a chosen status and body.
Supabase Storage's object API is served too (`db.storage`, tests/fakes/storage_routes.py).
"""

from __future__ import annotations

import json
import operator
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes import LocalServer, RecordedRequest, json_response
from tests.fakes.storage_routes import FakeStorage

REST = "/rest/v1"
RESERVED_PARAMS = frozenset({"select", "order", "limit", "offset", "columns", "on_conflict"})
UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)

RpcFunction = Callable[["FakePostgrest", dict[str, Any]], Any]


@dataclass(frozen=True)
class RpcSpec:
    params: tuple[str, ...]
    fn: RpcFunction


@dataclass
class _Failure:
    method: str
    path: str
    status: int
    body: Any
    times: int
    after_write: bool = False
    delay_s: float = 0.0


class PostgrestError(Exception):
    def __init__(
        self, status: int, code: str | None, message: str, details: Any = None, hint: Any = None
    ):
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "details": details, "hint": hint, "message": message}


def increment_tokens(db: FakePostgrest, args: dict[str, Any]) -> None:
    """As in SQL: UPDATE users SET input_tokens += .., output_tokens += .. WHERE id = user_id."""
    user_id = str(args["user_id"])
    if not UUID_RE.match(user_id):
        raise PostgrestError(400, "22P02", f'invalid input syntax for type uuid: "{user_id}"')
    for row in db.tables.get("users", []):
        if str(row.get("id")) == user_id:
            row["input_tokens"] = int(row.get("input_tokens") or 0) + int(args["input_count"])
            row["output_tokens"] = int(row.get("output_tokens") or 0) + int(args["output_count"])


class FakePostgrest(LocalServer):
    def __init__(
        self,
        tables: dict[str, list[dict[str, Any]]] | None = None,
        *,
        api_key: str = "service-role-test-key",
        uuid_columns: dict[str, set[str]] | None = None,
        functions: dict[str, RpcSpec] | None = None,
    ) -> None:
        super().__init__()
        self.tables: dict[str, list[dict[str, Any]]] = {
            "users": [], "esp_lessons": [], "lesson_vocabulary": [], **(tables or {})
        }  # fmt: skip
        self.api_key = api_key
        # Columns of type uuid: a filter with a malformed value fails like Postgres (22P02).
        self.uuid_columns = uuid_columns if uuid_columns is not None else {"users": {"id"}}
        self.functions: dict[str, RpcSpec] = {
            "increment_tokens": RpcSpec(
                ("user_id", "input_count", "output_count"), increment_tokens
            ),
            **(functions or {}),
        }
        self._failures: list[_Failure] = []
        self.storage = FakeStorage()  # /storage/v1 on the same origin, as a Supabase project

    @property
    def url(self) -> str:
        """What goes in SUPABASE_URL (the client appends /rest/v1)."""
        return self.origin

    def fail(
        self,
        method: str,
        path: str,
        status: int = 500,
        body: Any = None,
        times: int = 1,
        *,
        after_write: bool = False,
        delay_s: float = 0.0,
    ) -> None:
        """The next `times` requests to `path` (e.g. `/rest/v1/rpc/increment_tokens`) fail.

        With `after_write` a table request is carried out first and only its answer is the
        failure, sent after `delay_s`: a write that committed while the client never heard
        (a lost response, or a worker killed while it waits).
        """
        if body is None:
            body = {"code": "XX000", "details": None, "hint": None, "message": "fake failure"}
        self._failures.append(
            _Failure(method.upper(), path, status, body, times, after_write, delay_s)
        )

    def rest_requests(
        self, method: str | None = None, path: str | None = None
    ) -> list[RecordedRequest]:
        return [
            r for r in self.requests
            if (method is None or r.method == method.upper()) and (path is None or r.path == path)
        ]  # fmt: skip

    def rpc_calls(self, name: str) -> list[Any]:
        return [r.body for r in self.rest_requests("POST", f"{REST}/rpc/{name}")]

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", REST + "/rpc/{fn}", self._rpc)
        app.router.add_route("*", REST + "/{table}", self._table)
        self.storage.routes(app, self._pre)
        app.router.add_route("*", "/{tail:.*}", self._not_found)

    # --- handlers ------------------------------------------------------------------------

    async def _not_found(self, request: web.Request) -> web.Response:
        return json_response(404, {"message": "no Route matched with those values"})

    def _pre(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("apikey")
        if not key:
            return json_response(
                401,
                {"message": "No API key found in request",
                 "hint": "No `apikey` request header or url param was found."},
            )  # fmt: skip
        if key != self.api_key:
            return json_response(
                401,
                {"message": "Invalid API key",
                 "hint": "Double check your Supabase `anon` or `service_role` API key."},
            )  # fmt: skip
        if (failure := self._take_failure(request, after_write=False)) is not None:
            return json_response(failure.status, failure.body)
        return None

    def _take_failure(self, request: web.Request, *, after_write: bool) -> _Failure | None:
        for failure in self._failures:
            if (
                failure.times > 0
                and failure.after_write == after_write
                and failure.method == request.method
                and failure.path == request.path
            ):
                failure.times -= 1
                return failure
        return None

    async def _rpc(self, request: web.Request) -> web.Response:
        if (early := self._pre(request)) is not None:
            return early
        name = request.match_info["fn"]
        if request.method in ("GET", "HEAD"):
            args: Any = dict(request.query)
        else:
            try:
                args = await _read_json(request, default={})
            except PostgrestError as exc:
                return json_response(exc.status, exc.body)
        spec = self.functions.get(name)
        if spec is None or not isinstance(args, dict) or set(args) != set(spec.params):
            given = ", ".join(sorted(args)) if isinstance(args, dict) else ""
            return json_response(
                404,
                {"code": "PGRST202",
                 "details": f"Searched for the function public.{name} with parameters {given} "
                            "or with a single unnamed json/jsonb parameter, but no matches were "
                            "found in the schema cache.",
                 "hint": None,
                 "message": f"Could not find the function public.{name}({given}) in the "
                            "schema cache"},
            )  # fmt: skip
        try:
            result = spec.fn(self, args)
        except PostgrestError as exc:
            return json_response(exc.status, exc.body)
        if result is None:
            return web.Response(status=204)
        return json_response(200, result)

    async def _table(self, request: web.Request) -> web.Response:
        if (early := self._pre(request)) is not None:
            return early
        table = request.match_info["table"]
        if table not in self.tables:
            return json_response(
                404,
                {"code": "PGRST205", "details": None, "hint": None,
                 "message": f"Could not find the table 'public.{table}' in the schema cache"},
            )  # fmt: skip
        response = await self._table_response(request, table)
        if (late := self._take_failure(request, after_write=True)) is not None:
            await self.pause(late.delay_s)
            return json_response(late.status, late.body)
        return response

    async def _table_response(self, request: web.Request, table: str) -> web.Response:
        prefer = _prefer(request.headers.get("Prefer", ""))
        try:
            body = await _read_json(request, default=None)
            if request.method in ("GET", "HEAD"):
                rows = self._select(table, request)
                return self._rows_response(request, 200, rows)
            if request.method == "POST":
                rows = self._insert(table, request, prefer, body)
                return self._write_response(request, prefer, 201, rows)
            if request.method == "PATCH":
                rows = self._update(table, request, body)
                return self._write_response(request, prefer, 200, rows)
            if request.method == "DELETE":
                rows = self._delete(table, request)
                return self._write_response(request, prefer, 200, rows)
        except PostgrestError as exc:
            return json_response(exc.status, exc.body)
        return json_response(405, {"message": f"method {request.method} not allowed"})

    # --- table operations --------------------------------------------------------------------

    def _matching(self, table: str, request: web.Request) -> list[dict[str, Any]]:
        filters = [(k, v) for k, v in request.query.items() if k not in RESERVED_PARAMS]
        rows = self.tables[table]
        for column, expression in filters:
            rows = [r for r in rows if _matches(table, r, column, expression, self.uuid_columns)]
        return rows

    def _select(self, table: str, request: web.Request) -> list[dict[str, Any]]:
        rows = self._matching(table, request)
        if order := request.query.get("order"):
            for part in reversed(order.split(",")):
                column, _, direction = part.partition(".")
                rows = sorted(
                    rows,
                    key=lambda r, c=column: (r.get(c) is None, r.get(c)),  # type: ignore[misc]
                    reverse=direction.startswith("desc"),
                )
        offset = int(request.query.get("offset", 0))
        rows = rows[offset:]
        if "limit" in request.query:
            rows = rows[: int(request.query["limit"])]
        return rows

    def _insert(
        self, table: str, request: web.Request, prefer: dict[str, str], body: Any
    ) -> list[dict[str, Any]]:
        new_rows = body if isinstance(body, list) else [body]
        if not all(isinstance(r, dict) for r in new_rows):
            raise PostgrestError(400, "PGRST102", "All object keys must match")
        conflict = (request.query.get("on_conflict") or "id").split(",")
        merge = prefer.get("resolution") in ("merge-duplicates", "ignore-duplicates")
        written = []
        for new in new_rows:
            row = {**new}
            if merge and all(c in row for c in conflict):
                existing = next(
                    (r for r in self.tables[table] if all(r.get(c) == row[c] for c in conflict)),
                    None,
                )
                if existing is not None:
                    # ON CONFLICT DO UPDATE returns the row; DO NOTHING returns nothing for it.
                    if prefer["resolution"] == "merge-duplicates":
                        existing.update(row)
                        written.append(existing)
                    continue
            if "id" in row and any(r.get("id") == row["id"] for r in self.tables[table]):
                raise PostgrestError(
                    409,
                    "23505",
                    f'duplicate key value violates unique constraint "{table}_pkey"',
                    f"Key (id)=({row['id']}) already exists.",
                )
            row.setdefault("id", str(uuid.uuid4()))
            row.setdefault("created_at", datetime.now(UTC).isoformat())
            self.tables[table].append(row)
            written.append(row)
        return written

    def _update(self, table: str, request: web.Request, changes: Any) -> list[dict[str, Any]]:
        if not isinstance(changes, dict):
            raise PostgrestError(400, "PGRST102", "Empty or invalid json")
        rows = self._matching(table, request)
        for row in rows:
            row.update(changes)
        return rows

    def _delete(self, table: str, request: web.Request) -> list[dict[str, Any]]:
        rows = self._matching(table, request)
        ids = {id(r) for r in rows}
        self.tables[table] = [r for r in self.tables[table] if id(r) not in ids]
        return rows

    # --- responses -----------------------------------------------------------------------------

    def _rows_response(
        self, request: web.Request, status: int, rows: list[dict[str, Any]]
    ) -> web.Response:
        shaped = [_project(r, request.query.get("select", "*")) for r in rows]
        headers = {"Content-Range": f"0-{len(shaped) - 1}/*" if shaped else "*/0"}
        if request.headers.get("Accept", "").startswith("application/vnd.pgrst.object+json"):
            if len(shaped) != 1:
                return json_response(
                    406,
                    {"code": "PGRST116", "details": f"The result contains {len(shaped)} rows",
                     "hint": None,
                     "message": "JSON object requested, multiple (or no) rows returned"},
                )  # fmt: skip
            return json_response(status, shaped[0], headers)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        return json_response(status, shaped, headers)

    def _write_response(
        self, request: web.Request, prefer: dict[str, str], status: int, rows: list[dict[str, Any]]
    ) -> web.Response:
        if prefer.get("return") == "representation":
            return self._rows_response(request, status, rows)
        return web.Response(
            status=204 if status == 200 else status, headers={"Content-Range": "*/*"}
        )


async def _read_json(request: web.Request, *, default: Any) -> Any:
    raw = await request.read()
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise PostgrestError(400, "PGRST102", "Empty or invalid json") from None


def _prefer(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            out[key] = value
    return out


def _project(row: dict[str, Any], select: str) -> dict[str, Any]:
    columns = [c.strip() for c in select.split(",") if c.strip()]
    if not columns or "*" in columns:
        return dict(row)
    out = {}
    for column in columns:
        alias, _, source = column.partition(":")
        source = source or alias
        if source not in row:
            raise PostgrestError(400, "42703", f"column {source} does not exist")
        out[alias] = row[source]
    return out


def _matches(
    table: str, row: dict[str, Any], column: str, expression: str, uuid_columns: dict[str, set[str]]
) -> bool:
    negate = expression.startswith("not.")
    if negate:
        expression = expression[4:]
    op, _, literal = expression.partition(".")
    if (
        column in uuid_columns.get(table, set())
        and op in ("eq", "neq")
        and not UUID_RE.match(literal)
    ):
        raise PostgrestError(400, "22P02", f'invalid input syntax for type uuid: "{literal}"')
    value = row.get(column)
    result = _compare(op, value, literal)
    return not result if negate else result


def _compare(op: str, value: Any, literal: str) -> bool:
    if op == "is":
        return {"null": value is None, "true": value is True, "false": value is False}.get(
            literal, False
        )
    if op == "in":
        items = [i.strip().strip('"') for i in literal.strip("()").split(",")]
        return value is not None and _text(value) in items
    if value is None:
        return False
    if op in ("like", "ilike"):
        pattern = "^" + re.escape(literal).replace(r"\*", ".*").replace("%", ".*") + "$"
        return re.match(pattern, _text(value), re.IGNORECASE if op == "ilike" else 0) is not None
    left: Any = value
    right: Any = literal
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            right = float(literal)
        except ValueError:
            return False
    else:
        left = _text(value)
    compare = _OPERATORS.get(op)
    if compare is None:
        raise PostgrestError(400, "PGRST100", f'"failed to parse filter ({op}.{literal})"')
    return bool(compare(left, right))


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)
