"""`generate-audio-lesson`: a lesson read by Amazon Polly into S3, and one `audio_lessons` row.

Queue `audio-jobs`. Payload `{lessonId, userId}` (INTEROP §7), optional `language` (the
lesson's terms' language, for the voice; default English: Joanna, en-US, neural). Steps
(progress on the left):

    10  the usage check: Supabase RPC `can_create_audio_lesson(user_id)`; "no" fails the job,
          an absent function is said once in the log and skipped
    20  the lesson (`esp_lessons` by id, which must belong to the user) and its
          `lesson_vocabulary` → the script: title, then per term the term, its definition
          and its example sentence, then the lesson's conversation (`chat_content`)
    30  Polly, chunk by chunk (processors.shared.polly) → one MP3, its duration counted
    80  S3 PutObject to AWS_S3_BUCKET at `audio-lessons/<userId>/<lessonId>-<ms>.mp3`, private
    90  the `audio_lessons` row: user_id, lesson_id, title, status `completed`, audio_url
          (AWS_S3_PUBLIC_BASE_URL + key when set, else a presigned GET URL valid
          AUDIO_URL_EXPIRES_S), audio_file_path (the key), audio_duration (seconds)
    100 the row, as Supabase returns it

Written once across retries and `kill -9`, with the job's state (processors.shared.job_state):
`<ms>` and the row id are recorded (HSETNX) before first use, so every run of the job uses
the same key (a retry overwrites the object rather than adding one) and the same row id
(`ON CONFLICT (id) DO NOTHING` adopts a row a crashed run inserted). The object carries the
job id and duration as metadata: a run that finds its object already there (a crash between
the upload and recording it) skips Polly; a first run, its key just made, does not look. When
the job fails for good (`on_final_failure`: permanent, last attempt, timeout, rate-limit cap,
stalls) a row with status `failed` is written under that same id, once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

from processors.shared.audio_job import AudioKit, run_once, state_of
from processors.shared.audio_store import AudioStore
from processors.shared.aws import classify, error_of
from processors.shared.job_state import JobState
from processors.shared.polly import Synthesizer
from worker.context import JobContext
from worker.contract_types import AudioLessonPayload, AudioLessonRow
from worker.errors import PermanentJobError
from worker.registry import FinalFailure, ProcessorSpec

JOB_NAME = "generate-audio-lesson"
BUCKET_VARIABLE = "AWS_S3_BUCKET"
DEFAULT_BUCKET = "unilingo-audio-lessons"
PUBLIC_BASE_VARIABLE = "AWS_S3_PUBLIC_BASE_URL"
S3 = "Amazon S3"
META_JOB = "job-id"
META_DURATION = "duration-s"


def build(env: Mapping[str, str]) -> ProcessorSpec:
    kit = AudioKit.build(JOB_NAME, env)
    bucket = env.get(BUCKET_VARIABLE, "").strip() or DEFAULT_BUCKET
    public_base = env.get(PUBLIC_BASE_VARIABLE, "").strip().rstrip("/") or None
    processor = AudioLessonProcessor(
        kit.synthesizer,
        # SigV4 for the presigned URLs too (botocore presigns S3 with SigV2 unless told, and
        # regions opened since 2014 accept only SigV4).
        kit.aws_client("s3", signature_version="s3v4"),
        kit.store,
        bucket=bucket,
        public_base=public_base,
        url_expires_s=kit.settings.url_expires_s,
    )
    where = f"{public_base}/…" if public_base else "presigned URLs"
    description = f"a lesson read by Amazon Polly into S3 bucket {bucket} ({where})"
    return kit.spec(JOB_NAME, processor, description)


class AudioLessonProcessor:
    def __init__(
        self,
        synthesizer: Synthesizer,
        s3: Any,
        store: AudioStore,
        *,
        bucket: str,
        public_base: str | None,
        url_expires_s: int,
    ) -> None:
        self.synthesizer = synthesizer
        self.s3 = s3
        self.store = store
        self.bucket = bucket
        self.public_base = public_base
        self.url_expires_s = url_expires_s

    async def run(self, data: dict[str, Any], ctx: JobContext) -> AudioLessonRow:
        payload = cast(AudioLessonPayload, data)  # validated against the contract by the runtime
        lesson_id, user_id = str(payload["lessonId"]), payload["userId"]

        async def steps(state: JobState) -> dict[str, Any]:
            await ctx.progress(10)
            if not state.get("usage_checked"):
                await self.store.check_usage(user_id, ctx.log)
                await state.put({"usage_checked": True})
            await ctx.progress(20)
            lesson = await self.store.lesson(lesson_id)
            if str(lesson.get("user_id") or user_id) != user_id:
                raise PermanentJobError(f"Lesson {lesson_id} belongs to another user")
            await state.put_new("title", str(lesson.get("title") or ""))
            row_id, _ = await state.put_new("row_id", str(uuid.uuid4()))
            ms, new_key = await state.put_new("ms", int(time.time() * 1000))
            key = f"audio-lessons/{user_id}/{lesson_id}-{ms}.mp3"
            if (stored := state.get("stored")) is None:
                # A key made just now names no object yet: no HEAD to find out.
                existing = None if new_key else await self._existing(key, ctx)
                stored = existing or await self._make(lesson, payload.get("language"), key, ctx)
                await state.put({"stored": stored})
            await ctx.progress(90)
            completed = {
                "status": "completed",
                "audio_url": await self._url(key),
                "audio_file_path": key,
                "audio_duration": stored["duration_s"],
            }
            row = await self.store.insert_once(
                {"id": row_id, "user_id": user_id, "lesson_id": lesson_id,
                 "title": lesson.get("title"), **completed}
            )  # fmt: skip
            if row.get("status") != "completed":  # a failed run's row under this id
                row = await self.store.update(row_id, completed) or row
            return row

        return cast(AudioLessonRow, await run_once(ctx, steps))

    async def failed(self, failure: FinalFailure) -> None:
        """The job failed for good: a row with status `failed` under the job's row id."""
        payload = cast(AudioLessonPayload, failure.payload)
        state = await state_of(failure)
        row_id, _ = await state.put_new("row_id", str(uuid.uuid4()))
        row = await self.store.insert_once(
            {
                "id": row_id,
                "user_id": payload["userId"],
                "lesson_id": str(payload["lessonId"]),
                "title": state.get("title"),
                "status": "failed",
                "audio_url": None,
                "audio_file_path": None,
                "audio_duration": None,
            }
        )
        failure.log.info("audio_lessons row {} has status {}: {}", row_id, row.get("status"),
                         failure.reason)  # fmt: skip

    async def _make(
        self, lesson: Mapping[str, Any], language: str | None, key: str, ctx: JobContext
    ) -> dict[str, Any]:
        vocabulary = await self.store.vocabulary(str(lesson["id"]))
        script = lesson_script(lesson, vocabulary)
        await ctx.progress(30)
        speech = await self.synthesizer.read_aloud(script, language, ctx)
        await ctx.progress(80)
        metadata = {META_JOB: ctx.job_id, META_DURATION: f"{speech.duration_s:.3f}"}
        await self._s3(
            "store",
            key,
            self.s3.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=speech.audio,
            ContentType="audio/mpeg",
            Metadata=metadata,
        )
        ctx.log.info("Stored s3://{}/{} ({} bytes)", self.bucket, key, len(speech.audio))
        return {"duration_s": round(speech.duration_s, 3)}

    async def _existing(self, key: str, ctx: JobContext) -> dict[str, Any] | None:
        """This job's object, when an earlier run stored it and crashed before saying so.

        Without s3:ListBucket in the IAM policy, S3 answers a missing key's HEAD with 403, not
        404: both mean "not there" here (PutObject reports a real credentials problem)."""
        from botocore.exceptions import ClientError

        try:
            head = await asyncio.to_thread(self.s3.head_object, Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
                return None
            raise classify(exc, S3, "s3") from exc
        except Exception as exc:
            raise classify(exc, S3, "s3") from exc
        metadata = head.get("Metadata") or {}
        if metadata.get(META_JOB) != ctx.job_id or META_DURATION not in metadata:
            return None
        ctx.log.info("s3://{}/{} was stored by an earlier run; Polly skipped", self.bucket, key)
        return {"duration_s": float(metadata[META_DURATION])}

    async def _url(self, key: str) -> str:
        if self.public_base:
            return f"{self.public_base}/{key}"
        url: str = await self._s3(
            "sign a URL for",
            key,
            self.s3.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.url_expires_s,
        )
        return url

    async def _s3(self, doing: str, key: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)  # boto3 blocks
        except Exception as exc:
            error = classify(exc, S3, "s3")
            if error_of(exc)[0] == "NoSuchBucket":
                error = PermanentJobError(
                    f"{S3} has no bucket {self.bucket!r} ({BUCKET_VARIABLE}): could not {doing} "
                    f"{key}"
                )
            raise error from exc


def lesson_script(lesson: Mapping[str, Any], vocabulary: list[dict[str, Any]]) -> str:
    """What Polly reads: the title; per term the term, its definition and its example; then
    the conversation (`chat_content`, `{"conversation": [{speaker, message}]}` as JSON text)."""
    lines = [_sentence(lesson.get("title"))]
    for word in vocabulary:
        for column in ("keywords", "definition", "example_sentence_target"):
            lines.append(_sentence(word.get(column)))
    for turn in _conversation(lesson.get("chat_content")):
        lines.append(_sentence(turn))
    return "\n".join(line for line in lines if line)


def _conversation(chat_content: Any) -> list[str]:
    try:
        script = json.loads(chat_content) if isinstance(chat_content, str) else chat_content
    except ValueError:
        return []
    turns = script.get("conversation") if isinstance(script, Mapping) else None
    return [str(t.get("message") or "") for t in turns or [] if isinstance(t, Mapping)]


def _sentence(value: Any) -> str:
    text = " ".join(str(value or "").split())
    if text and text[-1] not in ".!?…。！？":
        text += "."
    return text
