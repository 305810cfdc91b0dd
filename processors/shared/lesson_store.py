"""The lesson tables in Supabase (INTEROP §4): `esp_lessons` and `lesson_vocabulary`, written once.

Every write here can be repeated after a crash without creating a second row:

- `insert_lesson` writes the row with the id the caller chose (and recorded beforehand) as
  `INSERT ... ON CONFLICT (id) DO NOTHING`, then reads the row back by id if the insert
  returned nothing (it already existed);
- `vocabulary_written` tells whether a lesson's vocabulary is there: `insert_vocabulary`
  writes all of a lesson's rows in one INSERT, which Postgres applies wholly or not at all,
  so one row found means all of them are;
- `set_chat_content` is an UPDATE by id, the same however often it runs.

Rows by id and how a failure is classified: processors.shared.rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from postgrest import APIError
from postgrest.types import ReturnMethod

from processors.shared.rows import classify_db_error, get_by_id, insert_once, update_by_id
from worker.errors import JobError

if TYPE_CHECKING:
    from postgrest import AsyncPostgrestClient

LESSONS = "esp_lessons"
VOCABULARY = "lesson_vocabulary"


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
            raise _classified(exc, f"read the vocabulary of lesson {lesson_id}") from exc
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
            raise _classified(exc, f"save the vocabulary of lesson {lesson}") from exc

    async def set_chat_content(self, lesson_id: str, chat_content: str) -> dict[str, Any] | None:
        """The updated row, or None when no row has that id any more."""
        doing = f"save the conversation of lesson {lesson_id}"
        changes = {"chat_content": chat_content}
        return await update_by_id(self.client, LESSONS, lesson_id, changes, doing)


def _classified(exc: BaseException, doing: str) -> JobError:
    # The lesson ids are made here as uuids (see processors/generate_lesson.py).
    return classify_db_error(exc, doing, LESSONS)
