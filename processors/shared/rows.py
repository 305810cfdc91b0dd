"""Rows by id in a Supabase table (PostgREST): written once, read, updated; failures classified.

Every write here can be repeated after a crash without creating a second row:

- `insert_once` writes the row with the id the caller chose (and recorded beforehand) as
  `INSERT ... ON CONFLICT (id) DO NOTHING`, then reads the row back by id if the insert
  returned nothing (it already existed);
- `update_by_id` is an UPDATE by id, the same however often it runs.

How a PostgREST failure maps onto the worker's classes (`classify_db_error`):

    connection error, timeout, 5xx-type codes    → RetryableJobError
    Postgres classes 22 (bad data, e.g. an id that is not a uuid), 23 (constraint),
    42 (unknown table/column, permission), PGRST* (request refused)  → PermanentJobError
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from postgrest import APIError

from worker.errors import JobError, PermanentJobError, RetryableJobError

if TYPE_CHECKING:
    from postgrest import AsyncPostgrestClient

# Postgres SQLSTATE classes that fail the same way however often they are retried.
_PERMANENT_CLASSES = ("22", "23", "42")


async def insert_once(
    client: AsyncPostgrestClient, table: str, row: Mapping[str, Any], doing: str
) -> dict[str, Any]:
    """`INSERT ... ON CONFLICT (id) DO NOTHING` of `row` (which carries its `id`), then the row
    with that id: the one inserted, or the one a crashed earlier run had inserted."""
    try:
        query = client.table(table).upsert(dict(row), on_conflict="id", ignore_duplicates=True)
        response = await query.execute()
    except (APIError, httpx.HTTPError) as exc:
        raise classify_db_error(exc, doing, table) from exc
    rows = [r for r in rows_of(response.data) if str(r.get("id")) == str(row["id"])]
    if rows:
        return rows[0]
    # ON CONFLICT DO NOTHING returns no row for one that was already there: read it.
    existing = await get_by_id(client, table, str(row["id"]), doing)
    if existing is None:
        raise RetryableJobError(f"Supabase returned no {table} row {row['id']} after saving it")
    return existing


async def get_by_id(
    client: AsyncPostgrestClient, table: str, row_id: str, doing: str
) -> dict[str, Any] | None:
    try:
        response = await client.table(table).select("*").eq("id", row_id).limit(1).execute()
    except (APIError, httpx.HTTPError) as exc:
        raise classify_db_error(exc, doing, table) from exc
    rows = rows_of(response.data)
    return rows[0] if rows else None


async def update_by_id(
    client: AsyncPostgrestClient, table: str, row_id: str, changes: Mapping[str, Any], doing: str
) -> dict[str, Any] | None:
    """The updated row, or None when no row has that id (any more)."""
    try:
        response = await client.table(table).update(dict(changes)).eq("id", row_id).execute()
    except (APIError, httpx.HTTPError) as exc:
        raise classify_db_error(exc, doing, table) from exc
    rows = rows_of(response.data)
    return rows[0] if rows else None


def rows_of(data: Any) -> list[dict[str, Any]]:
    """The rows of a PostgREST answer (a list of objects; anything else holds none)."""
    return [dict(r) for r in data if isinstance(r, Mapping)] if isinstance(data, list) else []


def classify_db_error(exc: BaseException, doing: str, id_table: str | None = None) -> JobError:
    """What a PostgREST failure means for the job; `id_table`, whose ids the worker makes as
    uuids, is named when Postgres refuses one (a column of another type)."""
    if isinstance(exc, APIError):
        code = str(exc.code or "")
        text = " ".join(str(p) for p in (exc.code, exc.message) if p) or "API error"
        if code.startswith("PGRST") or code[:2] in _PERMANENT_CLASSES:
            hint = ""
            if id_table and code in ("22P02", "428C9") and "uuid" not in str(exc.message or ""):
                hint = f" ({id_table}.id must be a uuid column that accepts the worker's ids)"
            return PermanentJobError(f"Could not {doing} (Supabase: {text}){hint}")
        return RetryableJobError(f"Could not {doing} (Supabase: {text})")
    return RetryableJobError(f"Could not {doing} (Supabase: {type(exc).__name__}: {exc})")
