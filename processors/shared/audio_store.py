"""The audio tables in Supabase: `audio_lessons` rows written once, the lesson read, the quota RPC.

`insert_once` writes a row with the id the caller chose and recorded beforehand (in the job's
state) as `INSERT ... ON CONFLICT (id) DO NOTHING`, then reads it back by id when the insert
returned nothing: repeated after a crash, it adopts the row instead of writing a second one
(processors.shared.rows, as generate-lesson writes its lessons). `update` is by id, the
same however often it runs. Failures are classified by rows' `classify_db_error`.

`can_create_audio_lesson(user_id)` is the app's usage check. A project without that function
(PostgREST PGRST202) is told once per process in the log and the job goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from postgrest import APIError

from processors.shared.lesson_store import LESSONS, VOCABULARY, LessonStore
from processors.shared.rows import (
    classify_db_error,
    insert_once,
    rows_of,
    update_by_id,
)
from worker.errors import PermanentJobError

if TYPE_CHECKING:
    from loguru import Logger
    from postgrest import AsyncPostgrestClient

    from worker.joblog import JobLogger

AUDIO_LESSONS = "audio_lessons"
USAGE_FUNCTION = "can_create_audio_lesson"
NOT_ALLOWED = (
    "This user cannot create another audio lesson now (can_create_audio_lesson answered no): "
    "the plan's audio lesson allowance is used up."
)


class AudioStore:
    def __init__(self, client: AsyncPostgrestClient) -> None:
        self.client = client
        self.lessons = LessonStore(client)
        self.usage_function_missing = False  # said once in the log, then skipped

    async def insert_once(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Insert `row` (which carries its `id`) unless a row with that id exists; the row."""
        return await insert_once(self.client, AUDIO_LESSONS, row, f"save audio lesson {row['id']}")

    async def update(self, row_id: str, changes: Mapping[str, Any]) -> dict[str, Any] | None:
        """The updated row, or None when no row has that id."""
        doing = f"update audio lesson {row_id}"
        return await update_by_id(self.client, AUDIO_LESSONS, row_id, changes, doing)

    async def lesson(self, lesson_id: str) -> dict[str, Any]:
        """The `esp_lessons` row; PermanentJobError when there is none."""
        row = await self.lessons.get_lesson(lesson_id)
        if row is None:
            raise PermanentJobError(f"Lesson {lesson_id} not found in {LESSONS}")
        return row

    async def vocabulary(self, lesson_id: str) -> list[dict[str, Any]]:
        try:
            response = await (
                self.client.table(VOCABULARY).select("*").eq("lesson_id", lesson_id).execute()
            )
        except (APIError, httpx.HTTPError) as exc:
            doing = f"read the vocabulary of lesson {lesson_id}"
            raise classify_db_error(exc, doing, LESSONS) from exc
        return rows_of(response.data)

    async def check_usage(self, user_id: str, log: JobLogger | Logger) -> None:
        """PermanentJobError when `can_create_audio_lesson` says no; absent: go on."""
        if self.usage_function_missing:
            return
        try:
            response = await self.client.rpc(USAGE_FUNCTION, {"user_id": user_id}).execute()
        except APIError as exc:
            if exc.code == "PGRST202":
                self.usage_function_missing = True
                log.warning(
                    "Supabase has no function {}(user_id): audio lessons are not limited "
                    "per user (said once)",
                    USAGE_FUNCTION,
                )
                return
            raise classify_db_error(exc, "check the audio lesson allowance") from exc
        except httpx.HTTPError as exc:
            raise classify_db_error(exc, "check the audio lesson allowance") from exc
        if not allowed(response.data):
            raise PermanentJobError(NOT_ALLOWED)


def allowed(answer: Any) -> bool:
    """The function's answer: a boolean, or a row / one-row list with a boolean column."""
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, Mapping):
        for key in ("allowed", "can_create", USAGE_FUNCTION):
            if key in answer:
                return bool(answer[key])
        return bool(answer)
    return answer is None or bool(answer)
