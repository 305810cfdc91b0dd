"""Unit tests: settings, results encoding, registry, idempotency key, log redaction."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import subprocess

import pytest

from worker.errors import ConfigError, UnknownJobType
from worker.idempotency import idempotency_key
from worker.logs import flush_logs, setup_logging
from worker.registry import ProcessorSpec, Registry
from worker.results import UnsafeResult, node_json, to_json_safe
from worker.settings import Settings


def test_settings_defaults_match_the_node_worker() -> None:
    s = Settings.from_env({})
    assert (s.queue, s.prefix, s.concurrency) == ("ai-jobs", "bull", 3)
    assert s.limiter == {"max": 10, "duration": 1000}
    assert (s.health_port, s.shutdown_grace_s, s.log_format) == (3002, 25.0, "text")
    assert (s.redis.host, s.redis.port, s.redis.db, s.redis.tls) == ("127.0.0.1", 6379, 0, False)


def test_settings_read_every_documented_variable() -> None:
    s = Settings.from_env(
        {
            "WORKER_QUEUE": "q", "WORKER_PREFIX": "p", "WORKER_CONCURRENCY": "7",
            "WORKER_LIMITER_MAX": "4", "WORKER_LIMITER_DURATION_MS": "500",
            "WORKER_HEALTH_PORT": "4000", "PORT": "5000", "WORKER_SHUTDOWN_GRACE_S": "9.5",
            "LOG_FORMAT": "json",
        }
    )  # fmt: skip
    assert (s.queue, s.prefix, s.concurrency) == ("q", "p", 7)
    assert s.limiter == {"max": 4, "duration": 500}
    assert (s.health_port, s.shutdown_grace_s, s.log_format) == (4000, 9.5, "json")
    assert Settings.from_env({"PORT": "5000"}).health_port == 5000


def test_redis_precedence_and_url_parts() -> None:
    env = {
        "REDIS_PUBLIC_URL": "rediss://alice:p%40ss@public.example:6380/3",
        "REDIS_URL": "redis://private:6379",
        "REDIS_HOST": "host-only",
    }
    r = Settings.from_env(env).redis
    assert (r.host, r.port, r.db, r.username, r.password, r.tls) == (
        "public.example", 6380, 3, "alice", "p@ss", True,
    )  # fmt: skip
    assert r.redacted_url == "rediss://alice:***@public.example:6380/3"
    assert "p@ss" not in repr(r)
    del env["REDIS_PUBLIC_URL"]
    assert Settings.from_env(env).redis.host == "private"
    del env["REDIS_URL"]
    r = Settings.from_env({**env, "REDIS_PORT": "7000", "REDIS_PASSWORD": "pw"}).redis
    assert (r.host, r.port, r.password, r.source) == ("host-only", 7000, "pw", "REDIS_HOST")
    # The blocking wait needs a socket timeout longer than any BZPOPMIN (redis-py 8 default: 5 s).
    assert r.connection_kwargs()["socket_timeout"] > 10


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WORKER_CONCURRENCY": "three"}, "WORKER_CONCURRENCY"),
        ({"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        ({"WORKER_LIMITER_MAX": "-1"}, "WORKER_LIMITER_MAX"),
        ({"WORKER_HEALTH_PORT": "99999"}, "WORKER_HEALTH_PORT"),
        ({"PORT": "http"}, "PORT"),
        ({"WORKER_SHUTDOWN_GRACE_S": "nan"}, "WORKER_SHUTDOWN_GRACE_S"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"REDIS_URL": "http://x:1"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:1/zero"}, "REDIS_URL"),
        ({"REDIS_PUBLIC_URL": "redis://:secret@h:notaport"}, "REDIS_PUBLIC_URL"),
        ({"REDIS_HOST": "h", "REDIS_PORT": "x"}, "REDIS_PORT"),
    ],
)
def test_malformed_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert "secret" not in str(info.value)


def test_results_are_made_json_safe() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    out = to_json_safe({"at": when, "tags": ("a", "b"), "raw": b"\x00\xff", "n": 1.5})
    assert out == {"at": "2026-01-02T03:04:05.678Z", "tags": ["a", "b"], "raw": "AP8=", "n": 1.5}


@pytest.mark.parametrize(
    ("value", "where"),
    [({"score": math.nan}, "score"), ({"a": [1, math.inf]}, "a/1"), ({"big": 2**60}, "big"),
     ({"obj": object()}, "obj")],
)  # fmt: skip
def test_unsafe_results_fail_as_bugs(value: object, where: str) -> None:
    with pytest.raises(UnsafeResult, match=where):
        to_json_safe(value)


def test_node_json_is_what_json_stringify_writes() -> None:
    value = {"b": "héllo ✓ 日本 😀", "a": [1, 2.5, None, True], "nested": {"q": '"\\\n'}}
    node = subprocess.run(
        ["node", "-e", "process.stdout.write(JSON.stringify(JSON.parse(process.argv[1])))",
         json.dumps(value)],
        capture_output=True, check=True,
    )  # fmt: skip
    assert node_json(value).encode("utf-8") == node.stdout


def test_registry_refuses_duplicates_and_names_unknown_types() -> None:
    async def handler(payload: dict, ctx: object) -> dict:
        return {}

    registry = Registry()
    registry.register(ProcessorSpec("a", handler))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ProcessorSpec("a", handler))
    with pytest.raises(UnknownJobType) as info:
        registry.get("nope")
    assert str(info.value) == "Unknown job type: nope"


def test_idempotency_key_matches_the_web_service_test_vector() -> None:
    payload = {
        "content": "Idempotency test content. Medical terms: cardiology, pathology, radiology.",
        "subject": "Medicine",
        "topic": "Medical Specialties",
        "userId": "test-idempotency-user",
        "nativeLanguage": "English",
    }
    assert idempotency_key("generate-flashcards", payload) == (
        "idempotency:generate-flashcards:"
        "a24ac08a97b3e40de6cd10fe1b0abdd26a6324b613a4a4758d4b0947e3ced2f4"
    )


def test_idempotency_key_slices_content_like_javascript() -> None:
    # 999 ASCII chars then an emoji: JS slice(0, 1000) cuts the emoji's surrogate pair in half.
    payload = {"content": "x" * 999 + "😀 tail", "subject": "s", "topic": "t", "userId": "u"}
    script = (
        "const c=require('crypto');const p=JSON.parse(process.argv[1]);"
        "const o={jobType:'generate-flashcards',userId:p.userId,content:p.content.slice(0,1000),"
        "subject:p.subject,topic:p.topic,nativeLanguage:p.nativeLanguage};"
        "process.stdout.write('idempotency:generate-flashcards:'+"
        "c.createHash('sha256').update(JSON.stringify(o)).digest('hex'))"
    )
    node = subprocess.run(
        ["node", "-e", script, json.dumps(payload)], capture_output=True, check=True
    )
    assert idempotency_key("generate-flashcards", payload) == node.stdout.decode()


def test_log_lines_never_carry_a_secret() -> None:
    from loguru import logger

    out = io.StringIO()
    setup_logging("json", "INFO", ["sk-test-SECRET-123", "hunter2hunter2"], stream=out)
    with logger.contextualize(job_id="job-1"):
        logger.info("key is sk-test-SECRET-123 and url redis://:hunter2hunter2@h")
        try:
            raise RuntimeError("boom sk-test-SECRET-123")
        except RuntimeError:
            logger.exception("failed")
    flush_logs()  # lines are written by the sink's thread
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["job_id"] for line in lines] == ["job-1", "job-1"]
    assert "SECRET" not in out.getvalue() and "hunter2" not in out.getvalue()
    assert "***" in lines[0]["message"]
    assert lines[1]["error"] == "RuntimeError: boom ***"
    setup_logging("text", "INFO")
