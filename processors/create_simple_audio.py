"""`create-simple-audio`: a text read by Polly into Supabase Storage; its `audio_lessons` row.

Queue `audio-jobs`. Payload `{title, scriptText, userId, nativeLanguage?}` (INTEROP §7; the
voice by `nativeLanguage`, default English). Steps (progress on the left):

    10  the `audio_lessons` row: user_id, title, status `not_started`, audio_url `pending`
    20  Polly, chunk by chunk (processors.shared.polly) → one MP3, its duration counted
    80  upload to the Storage bucket `Audio_Lessons` at `<userId>/<audioLessonId>-<ms>.mp3`
    90  the row updated: status `completed`, audio_url (a signed URL valid
          AUDIO_URL_EXPIRES_S: the bucket is private), audio_file_path, audio_duration
    100 the updated row

Written once across retries and `kill -9` (processors.shared.job_state): the row id and `<ms>`
are recorded (HSETNX) before first use, so every run inserts the same row (`ON CONFLICT (id)
DO NOTHING`) and uploads to the same path (with upsert: a retry overwrites the object). When
the job fails for good (`on_final_failure`: permanent, last attempt, timeout, rate-limit cap,
stalls) the row, when there is one, gets status `failed`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from processors.shared.audio_job import AudioKit, run_once, state_of
from processors.shared.audio_store import AudioStore
from processors.shared.job_state import JobState
from processors.shared.polly import Synthesizer
from processors.shared.supabase_storage import SupabaseStorage
from worker.context import JobContext
from worker.contract_types import SimpleAudioPayload, SimpleAudioRow
from worker.errors import PermanentJobError
from worker.registry import FinalFailure, ProcessorSpec

JOB_NAME = "create-simple-audio"
BUCKET = "Audio_Lessons"


def build(env: Mapping[str, str]) -> ProcessorSpec:
    kit = AudioKit.build(JOB_NAME, env)
    storage = SupabaseStorage(kit.settings.supabase)
    processor = SimpleAudioProcessor(
        kit.synthesizer, kit.store, storage, kit.settings.url_expires_s
    )
    description = f"a text read by Amazon Polly into Supabase Storage bucket {BUCKET}"
    return kit.spec(JOB_NAME, processor, description, storage.aclose)


class SimpleAudioProcessor:
    def __init__(
        self,
        synthesizer: Synthesizer,
        store: AudioStore,
        storage: SupabaseStorage,
        url_expires_s: int,
    ) -> None:
        self.synthesizer = synthesizer
        self.store = store
        self.storage = storage
        self.url_expires_s = url_expires_s

    async def run(self, data: dict[str, Any], ctx: JobContext) -> SimpleAudioRow:
        payload = cast(SimpleAudioPayload, data)  # validated against the contract by the runtime
        user_id = payload["userId"]

        async def steps(state: JobState) -> dict[str, Any]:
            await ctx.progress(10)
            row_id, _ = await state.put_new("row_id", str(uuid.uuid4()))
            # Again on a retry: insert_once adopts the row already there, unchanged.
            await self.store.insert_once(
                {"id": row_id, "user_id": user_id, "title": payload["title"],
                 "status": "not_started", "audio_url": "pending"}
            )  # fmt: skip
            ms, _ = await state.put_new("ms", int(time.time() * 1000))
            path = f"{user_id}/{row_id}-{ms}.mp3"
            if (stored := state.get("stored")) is None:
                stored = await self._make(payload, path, ctx)
                await state.put({"stored": stored})
            await ctx.progress(90)
            changes = {
                "status": "completed",
                "audio_url": await self.storage.signed_url(BUCKET, path, self.url_expires_s),
                "audio_file_path": path,
                "audio_duration": stored["duration_s"],
            }
            row = await self.store.update(row_id, changes)
            if row is None:
                raise PermanentJobError(f"audio_lessons row {row_id} vanished before its audio "
                                        "could be recorded")  # fmt: skip
            return row

        return cast(SimpleAudioRow, await run_once(ctx, steps))

    async def failed(self, failure: FinalFailure) -> None:
        """The job failed for good: its row, when there is one, gets status `failed`."""
        state = await state_of(failure)
        if (row_id := state.get("row_id")) is None:
            return  # failed before its row was made
        if await self.store.update(str(row_id), {"status": "failed"}) is not None:
            failure.log.info("audio_lessons row {} has status failed: {}", row_id, failure.reason)

    async def _make(
        self, payload: SimpleAudioPayload, path: str, ctx: JobContext
    ) -> dict[str, Any]:
        await ctx.progress(20)
        speech = await self.synthesizer.read_aloud(
            payload["scriptText"], payload.get("nativeLanguage"), ctx
        )
        await ctx.progress(80)
        await self.storage.upload(BUCKET, path, speech.audio, "audio/mpeg", upsert=True)
        ctx.log.info("Stored {}/{} ({} bytes)", BUCKET, path, len(speech.audio))
        return {"duration_s": round(speech.duration_s, 3)}
