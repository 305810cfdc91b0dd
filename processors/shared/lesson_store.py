"""The lesson tables in Supabase (INTEROP §4): `esp_lessons` and `lesson_vocabulary`, written once.

Every write here can be repeated after a crash without creating a second row:

- `insert_lesson` writes the row with the id the caller chose (and recorded beforehand) as
  `INSERT ... ON CONFLICT (id) DO NOTHING`, then reads the row back by id if the insert
  returned nothing (it already existed);
- `vocabulary_written` tells whether a lesson's vocabulary is there: `insert_vocabulary`
  writes all of a lesson's rows in one INSERT, which Postgres applies wholly or not at all,
  so one row found means all of them are;
- `set_chat_content` is an UPDATE by id, the same however often it runs.

How a PostgREST failure maps onto the worker's classes (`classify_db_error`):

    connection error, timeout, 5xx-type codes    → RetryableJobError
    Postgres classes 22 (bad data, e.g. an id that is not a uuid), 23 (constraint),
    42 (unknown table/column, permission), PGRST* (request refused)  → PermanentJobError
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from postgrest import APIError
from postgrest.types import ReturnMethod

from worker.errors import JobError, PermanentJobError, RetryableJobError

if TYPE_CHECKING:
    from postgrest import AsyncPostgrestClient

LESSONS = "esp_lessons"
VOCABULARY = "lesson_vocabulary"
# Postgres SQLSTATE classes that fail the same way however often they are retried.
_PERMANENT_CLASSES = ("22", "23", "42")


class LessonStore:
    def __init__(self, client: AsyncPostgrestClient) -> None:
        self.client = client

    async def insert_lesson(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Insert `row` (which carries its `id`) unless a row with that id exists; the row."""
        return await insert_once(self.client, LESSONS, row, f"save the lesson {row['title']!r}")

    async def get_lesson(self, lesson_id: str) -> dict[str, Any] | None:
        return await get_by_id(self.client, LESSONS, lesson_id, f"read lesson {lesson_id}")

    async def vocabulary_written(self, lesson_id: str) -> bool:
        try:
            response = await (
                self.client.table(VOCABULARY)
                .select("lesson_id")
                .eq("lesson_id", lesson_id)
                .limit(1)
                .execute()
            )
        except (APIError, httpx.HTTPError) as exc:
            raise classify_db_error(exc, f"read the vocabulary of lesson {lesson_id}") from exc
        return bool(response.data)

    async def insert_vocabulary(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """All of one lesson's rows in one INSERT (one transaction in Postgres)."""
        if not rows:
            return
        try:
            await (
                self.client.table(VOCABULARY)
                .insert([dict(r) for r in rows], returning=ReturnMethod.minimal)
                .execute()
            )
        except (APIError, httpx.HTTPError) as exc:
            lesson = rows[0].get("lesson_id")
            raise classify_db_error(exc, f"save the vocabulary of lesson {lesson}") from exc

    async def set_chat_content(self, lesson_id: str, chat_content: str) -> dict[str, Any] | None:
        """The updated row, or None when no row has that id any more."""
        try:
            response = await (
                self.client.table(LESSONS)
                .update({"chat_content": chat_content})
                .eq("id", lesson_id)
                .execute()
            )
        except (APIError, httpx.HTTPError) as exc:
            raise classify_db_error(exc, f"save the conversation of lesson {lesson_id}") from exc
        rows = _rows(response.data)
        return rows[0] if rows else None


async def insert_once(
    client: AsyncPostgrestClient, table: str, row: Mapping[str, Any], doing: str
) -> dict[str, Any]:
    """`INSERT ... ON CONFLICT (id) DO NOTHING` of `row` (which carries its `id`), then the row
    with that id: the one inserted, or the one a crashed earlier run had inserted."""
    try:
        query = client.table(table).upsert(dict(row), on_conflict="id", ignore_duplicates=True)
        response = await query.execute()
    except (APIError, httpx.HTTPError) as exc:
        raise classify_db_error(exc, doing) from exc
    rows = [r for r in _rows(response.data) if str(r.get("id")) == str(row["id"])]
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
        raise classify_db_error(exc, doing) from exc
    rows = _rows(response.data)
    return rows[0] if rows else None


def _rows(data: Any) -> list[dict[str, Any]]:
    """The rows of a PostgREST answer (a list of objects; anything else holds none)."""
    return [dict(r) for r in data if isinstance(r, Mapping)] if isinstance(data, list) else []


def classify_db_error(exc: BaseException, doing: str) -> JobError:
    if isinstance(exc, APIError):
        code = str(exc.code or "")
        text = " ".join(str(p) for p in (exc.code, exc.message) if p) or "API error"
        if code.startswith("PGRST") or code[:2] in _PERMANENT_CLASSES:
            hint = ""
            if code in ("22P02", "428C9") and "uuid" not in str(exc.message or ""):
                # The lesson id is made here as a uuid (see processors/generate_lesson.py).
                hint = f" ({LESSONS}.id must be a uuid column that accepts the worker's ids)"
            return PermanentJobError(f"Could not {doing} (Supabase: {text}){hint}")
        return RetryableJobError(f"Could not {doing} (Supabase: {text})")
    return RetryableJobError(f"Could not {doing} (Supabase: {type(exc).__name__}: {exc})")
