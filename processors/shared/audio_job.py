"""What the two audio job types share: their settings and clients, and one resumable run.

Both need AWS (Polly; S3 for `generate-audio-lesson`) and Supabase. Without the AWS keys or
without Supabase the job type is not built (`ProviderMissing`: start-up and `check` list it
as disabled with the variables it needs, and its jobs fail at once with that sentence).
`AudioKit.build` makes what both are built from: the settings, the `audio_lessons` store, the
Polly synthesizer and one boto3 Session for every AWS client of the processor; `kit.spec`
registers the processor with what to close at shutdown and its final-failure hook.

`run_once` wraps a job's steps: a result already saved in the job's state (a re-run after a
crash between "returned" and "marked completed") is answered from there. A final failure is
recorded by each type's `on_final_failure` hook (worker.registry), which the run loop calls
wherever a job fails for good: a permanent error, the last attempt (a timeout included), the
rate-limit wait cap, too many stalls. `state_of(failure)` is the job's state for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from processors.shared.audio_store import AudioStore
from processors.shared.aws import KEY_ID_VARIABLE, SECRET_VARIABLE, AwsSettings, boto3_client
from processors.shared.job_state import JobState
from processors.shared.polly import Synthesizer
from processors.shared.supabase_client import (
    KEY_VARIABLES,
    URL_VARIABLES,
    SupabaseSettings,
    make_client,
)
from worker.context import JobContext
from worker.errors import ConfigProblems, ProviderMissing
from worker.providers import POLLY, Provider, ProviderSettings
from worker.registry import FinalFailure, ProcessorSpec
from worker.settings import _Reader

URL_EXPIRES_VARIABLE = "AUDIO_URL_EXPIRES_S"
# SigV4 presigned URLs live at most 7 days; Storage's signed URLs get the same by default.
MAX_URL_EXPIRES_S = 7 * 86_400


@dataclass(frozen=True)
class AudioSettings:
    aws: AwsSettings
    supabase: SupabaseSettings
    polly: ProviderSettings
    url_expires_s: int

    @classmethod
    def from_env(cls, job_name: str, env: Mapping[str, str]) -> AudioSettings:
        """ProviderMissing without AWS keys or Supabase; ConfigError for malformed values."""
        aws = AwsSettings.from_env(env)
        problems = ConfigProblems()
        supabase = problems.take(lambda: SupabaseSettings.from_env(env))
        problems.raise_any()  # half a Supabase configuration stops start-up, as elsewhere
        missing: list[str] = []
        what: list[str] = []
        if aws is None:
            missing += [KEY_ID_VARIABLE, SECRET_VARIABLE]
            what.append("AWS (Polly)")
        if supabase is None:
            missing += [URL_VARIABLES[-1], KEY_VARIABLES[0]]
            what.append("Supabase")
        if missing:
            raise ProviderMissing(job_name, what, missing)
        assert aws is not None and supabase is not None
        polly = problems.take(lambda: ProviderSettings.from_env(POLLY, env))
        expires = _Reader(env, problems).integer(URL_EXPIRES_VARIABLE, MAX_URL_EXPIRES_S,
                                                 low=60, high=MAX_URL_EXPIRES_S)  # fmt: skip
        problems.raise_any()
        assert polly is not None and expires is not None
        return cls(aws, supabase, polly, expires)


class AudioProcessor(Protocol):
    """An audio job type's processor: its handler and its final-failure hook."""

    async def run(self, data: dict[str, Any], ctx: JobContext) -> Any: ...

    async def failed(self, failure: FinalFailure) -> None: ...


Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class AudioKit:
    """What an audio processor is built from; `spec` closes it at shutdown."""

    settings: AudioSettings
    store: AudioStore
    synthesizer: Synthesizer
    session: Any  # boto3 Session: every AWS client of the processor is made from it
    http: httpx.AsyncClient  # under the store's PostgREST client

    @classmethod
    def build(cls, job_name: str, env: Mapping[str, str]) -> AudioKit:
        """ProviderMissing without AWS keys or Supabase; ConfigError for malformed values."""
        settings = AudioSettings.from_env(job_name, env)
        session = settings.aws.session()
        postgrest, http = make_client(settings.supabase)
        polly = Synthesizer(boto3_client(session, "polly"), Provider(settings.polly))
        return cls(settings, AudioStore(postgrest), polly, session, http)

    def aws_client(self, service: str, **config: Any) -> Any:
        return boto3_client(self.session, service, **config)

    def spec(
        self, name: str, processor: AudioProcessor, description: str, *also_close: Closer
    ) -> ProcessorSpec:
        async def aclose() -> None:
            await self.http.aclose()
            for close in also_close:
                await close()

        return ProcessorSpec(
            name=name,
            handler=processor.run,
            description=description,
            aclose=aclose,
            on_final_failure=processor.failed,
        )


async def state_of(failure: FinalFailure) -> JobState:
    """The state the job's runs kept, for its `on_final_failure` hook."""
    return await JobState.load(failure.redis, failure.state_key)


async def run_once(
    ctx: JobContext, steps: Callable[[JobState], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """`steps(state)` once per job: resumed from the state, its result kept there."""
    state = await JobState.load(ctx.redis, ctx.state_key)
    if (done := state.get("result")) is not None:
        ctx.log.info("Audio already made by an earlier run; returning its result")
        await ctx.progress(100)
        return dict(done)
    if not state.is_fresh:
        ctx.log.info("Resuming from the saved state: {}", ", ".join(sorted(state.fields)))
    result = await steps(state)
    await state.finish(result)
    await ctx.progress(100)
    return result
