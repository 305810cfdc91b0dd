"""Several queues in one service (WORKER_QUEUES), or one service per queue: settings, the loops,
/health, /metrics, stats and shutdown over every queue consumed (issue 15, item 1)."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError, ConfigErrors
from worker.settings import QueueSettings, Settings, queue_variable, unread_variables


def test_one_queue_by_default_as_before() -> None:
    s = Settings.from_env({})
    assert s.consumed == (QueueSettings("ai-jobs", 3, 10, 1000),)
    assert Settings.from_env({"WORKER_QUEUE": "q"}).consumed == (QueueSettings("q", 3, 10, 1000),)


def test_each_queue_has_its_settings_else_the_unsuffixed_ones() -> None:
    s = Settings.from_env(
        {
            "WORKER_QUEUES": " ai-jobs , audio-jobs ", "WORKER_CONCURRENCY": "4",
            "WORKER_LIMITER_MAX": "20", "WORKER_CONCURRENCY_AUDIO_JOBS": "2",
            "WORKER_LIMITER_MAX_AUDIO_JOBS": "0", "WORKER_LIMITER_DURATION_MS_AI_JOBS": "500",
        }
    )  # fmt: skip
    assert s.consumed == (
        QueueSettings("ai-jobs", 4, 20, 500),
        QueueSettings("audio-jobs", 2, 0, 1000),
    )
    assert (s.queue, s.concurrency, s.limiter) == ("ai-jobs", 4, {"max": 20, "duration": 500})
    audio = s.for_queue(s.consumed[1])
    assert (audio.queue, audio.concurrency, audio.limiter, audio.consumed) == (
        "audio-jobs", 2, None, (s.consumed[1],),
    )  # fmt: skip
    # One service per queue: the other queue's service lists it alone.
    alone = Settings.from_env({"WORKER_QUEUES": "audio-jobs", "WORKER_CONCURRENCY_AUDIO_JOBS": "5"})
    assert alone.consumed == (QueueSettings("audio-jobs", 5, 10, 1000),)
    assert alone.queue == "audio-jobs"
    assert queue_variable("WORKER_CONCURRENCY", "test.q-1") == "WORKER_CONCURRENCY_TEST_Q_1"
    # Per-queue variables are settings, not typos.
    assert unread_variables({"WORKER_CONCURRENCY_AUDIO_JOBS": "2"}) == []


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"WORKER_QUEUES": "ai-jobs,,audio-jobs"}, "WORKER_QUEUES", "an empty queue name"),
        ({"WORKER_QUEUES": "ai-jobs,audio-jobs,ai-jobs"}, "WORKER_QUEUES", "listed twice"),
        ({"WORKER_QUEUES": "audio-jobs,audio_jobs"}, "WORKER_QUEUES", "would share"),
        ({"WORKER_QUEUES": "bull:x"}, "WORKER_QUEUES", "contains ':'"),
        ({"WORKER_QUEUES": "audio-jobs", "WORKER_QUEUE": "ai-jobs"}, "WORKER_QUEUE", "not among"),
        ({"WORKER_CONCURRENCY_AUDIO_JOBS": "2"}, "WORKER_CONCURRENCY_AUDIO_JOBS", "not consume"),
        (
            {"WORKER_QUEUES": "a,b", "WORKER_LIMITER_MAX_C": "1"},
            "WORKER_LIMITER_MAX_C",
            "known here: WORKER_LIMITER_MAX_A, WORKER_LIMITER_MAX_B",
        ),
        ({"WORKER_QUEUES": "a,b", "WORKER_CONCURRENCY_B": "0"}, "WORKER_CONCURRENCY_B", "at least"),
        (
            {"WORKER_QUEUES": "a,b", "WORKER_LIMITER_DURATION_MS_A": "soon"},
            "WORKER_LIMITER_DURATION_MS_A",
            "whole number",
        ),
    ],
)
def test_bad_queue_settings_are_refused_naming_the_variable(
    env: dict[str, str], variable: str, says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert not isinstance(caught.value, ConfigErrors)
    assert caught.value.variable == variable, str(caught.value)
    assert says in str(caught.value)
