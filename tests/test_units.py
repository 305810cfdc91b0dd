"""Unit tests: settings, results encoding, registry, idempotency key, log redaction and sink."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.errors import ConfigError, UnknownJobType
from worker.idempotency import idempotency_key
from worker.logs import flush_logs, setup_logging
from worker.registry import ProcessorSpec, Registry
from worker.results import UnsafeResult, node_json, to_json_safe
from worker.settings import Settings, unread_variables, variables_read

README = Path(__file__).resolve().parents[1] / "README.md"


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
    # Which variable to name when the port cannot be bound.
    assert Settings.from_env({"PORT": "5000"}).health_port_variable == "PORT"
    assert Settings.from_env({"PORT": "5000", "WORKER_HEALTH_PORT": "1"}).health_port_variable == (
        "WORKER_HEALTH_PORT"
    )
    assert Settings.from_env({}).health_port_variable == "WORKER_HEALTH_PORT"


def test_unread_worker_variables_are_named_with_the_closest_known_one() -> None:
    env = {"WORKER_CONCURENCY": "50", "WORKER_QUEUE": "q", "WORKER_FOO": "1", "PATH": "/bin"}
    assert unread_variables(env) == [
        "WORKER_CONCURENCY is not a setting of this worker and is ignored;"
        " did you mean WORKER_CONCURRENCY?",
        "WORKER_FOO is not a setting of this worker and is ignored; known: "
        + ", ".join(sorted(n for n in variables_read() if n.startswith("WORKER_"))),
    ]
    # Every documented WORKER_* variable counts as read (none would be warned about).
    documented = set(re.findall(r"^\| `(WORKER_[A-Z_]+)`", README.read_text(), re.M))
    assert len(documented) > 10
    assert documented <= variables_read(), documented - variables_read()


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
    value = {"b": "héllo ✓ 日本 😀", "a": [1, 2.5, None, True], "nested": {"q": '"\\\n'},
             "lone": ["a\udc00b", "\ud800", "x\ud83d"], "k\udfff": "pair \ud83d\ude00"}  # fmt: skip
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


def test_every_credential_variable_the_code_reads_is_redacted() -> None:
    from worker.logs import SECRET_VARIABLES

    root = README.parent
    sources = [*root.glob("worker/*.py"), *root.glob("processors/**/*.py")]
    named = set()
    for source in sources:
        text = source.read_text(encoding="utf-8")
        named |= set(re.findall(r'"([A-Z][A-Z0-9_]*(?:_KEY|_TOKEN|_PASSWORD|_SECRET))"', text))
    assert "AWS_SESSION_TOKEN" in named  # the scan sees the processors' variables
    assert named <= set(SECRET_VARIABLES), named - set(SECRET_VARIABLES)


def test_mypy_strict_covers_every_package() -> None:
    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text())
    shipped = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    assert pyproject["tool"]["mypy"]["strict"] is True
    assert shipped <= set(pyproject["tool"]["mypy"]["packages"])


@pytest.fixture
def stderr_logging_after() -> Iterator[None]:
    yield
    setup_logging("text", "INFO")


class GatedStream(io.StringIO):
    """A stream whose writes wait until `gate` is set: a stderr reader that stalled."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.writer_threads: set[str] = set()

    def write(self, text: str) -> int:
        self.writer_threads.add(threading.current_thread().name)
        self.gate.wait(10)
        return super().write(text)


def test_logging_calls_do_not_wait_for_the_stream(stderr_logging_after: None) -> None:
    from loguru import logger

    out = GatedStream()
    setup_logging("text", "INFO", ["hunter2hunter2"], stream=out)
    for i in range(500):  # would block 10 s on the first line if the caller wrote
        logger.info("line {} hunter2hunter2", i)
    assert out.getvalue() == ""
    out.gate.set()
    flush_logs()
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" | ", 1)[1] for line in lines] == [f"line {i} ***" for i in range(500)]
    assert out.writer_threads == {"log-writer"}


def test_text_lines_keep_their_order_context_and_redaction(stderr_logging_after: None) -> None:
    from loguru import logger

    out = io.StringIO()
    setup_logging("text", "INFO", ["sk-test-SECRET-123"], stream=out)

    def log_from(thread: int) -> None:
        for i in range(2000):
            with logger.contextualize(job_id=f"job-{thread}"):
                logger.info("{} {} sk-test-SECRET-123", thread, i)

    threads = [threading.Thread(target=log_from, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.debug("below the level")
    flush_logs()
    text = out.getvalue()
    assert "SECRET" not in text and "below the level" not in text
    lines = text.splitlines()
    assert len(lines) == 8000
    for thread in range(4):  # every line, each thread's in the order it logged them
        mine = [line for line in lines if f"| [job-{thread}] {thread} " in line]
        assert [int(line.split()[-2]) for line in mine] == list(range(2000))
        assert all(line.endswith(" ***") for line in mine)


def test_a_second_setup_drains_and_stops_the_first_writer(stderr_logging_after: None) -> None:
    from loguru import logger

    first, second = GatedStream(), io.StringIO()
    setup_logging("json", "INFO", stream=first)
    logger.info("to the first")
    threading.Timer(0.2, first.gate.set).start()
    setup_logging("text", "INFO", stream=second)  # logger.remove(): the first sink drains
    assert json.loads(first.getvalue())["message"] == "to the first"
    logger.info("to the second")
    flush_logs()
    assert "to the second" in second.getvalue() and "to the second" not in first.getvalue()
    assert [t.name for t in threading.enumerate()].count("log-writer") == 1


def test_the_writer_bounds_its_queue_by_waiting_never_by_dropping(
    stderr_logging_after: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from loguru import logger

    from worker import logs

    monkeypatch.setattr(logs, "_HIGH_WATER", 10)
    out = GatedStream()
    setup_logging("text", "INFO", stream=out)
    threading.Timer(0.3, out.gate.set).start()
    began = time.monotonic()
    for i in range(100):  # waits for the writer once 10 lines are queued
        logger.info("line {}", i)
    assert time.monotonic() - began > 0.25
    flush_logs()
    assert [line.rsplit(" ", 1)[1] for line in out.getvalue().splitlines()] == [
        str(i) for i in range(100)
    ]


def test_stdlib_logging_still_reaches_the_sink(stderr_logging_after: None) -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", ["p4ssw0rd-xyz"], stream=out)
    logging.getLogger("bullmq").warning("retrying with p4ssw0rd-xyz")
    logging.getLogger("bullmq").info("below WARNING: stdlib drops it")
    flush_logs()
    assert out.getvalue().count("\n") == 1
    assert "| WARNING | retrying with ***" in out.getvalue()


EXIT_SCRIPT = """
import sys
from loguru import logger
from worker.logs import setup_logging
setup_logging(sys.argv[1], "INFO", ["hunter2hunter2"])
for i in range(3000):
    logger.info("line {} hunter2hunter2", i)
if sys.argv[2] == "crash":
    raise RuntimeError("unhandled")
if sys.argv[2] == "remove":
    logger.remove()
    sys.stderr.write("after remove\\n")
    sys.stderr.flush()
    import os
    os._exit(3)
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("how", ["return", "crash", "remove"])
def test_every_line_is_written_before_the_process_ends(log_format: str, how: str) -> None:
    from tests.support.proc import REPO_ROOT

    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, log_format, how],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == {"return": 0, "crash": 1, "remove": 3}[how], done.stderr
    lines = done.stderr.splitlines()
    logged = [line for line in lines if "INFO" in line]
    assert len(logged) == 3000 and "hunter2" not in done.stderr
    assert all(f"line {i} ***" in line for i, line in enumerate(logged))
    if how == "crash":  # the lines that led to the crash come before its traceback
        assert lines.index("Traceback (most recent call last):") > lines.index(logged[-1])
    if how == "remove":
        assert lines[-1] == "after remove"


def test_text_lines_are_those_the_old_format_made(stderr_logging_after: None) -> None:
    """The writer thread builds what loguru rendered before from this format, to the character."""
    from loguru import logger

    def old_format(record: Any) -> str:
        context = "[{extra[job_id]}] " if record["extra"].get("job_id") else ""
        return (
            "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | " + context + "{message}\n{exception}"
        )

    out, reference = io.StringIO(), io.StringIO()
    setup_logging("text", "DEBUG", stream=out)
    logger.add(  # as the old setup_logging added its sink: a callable, these options
        reference.write, level="DEBUG", format=old_format, backtrace=False, diagnose=False,
        colorize=False, catch=True,
    )  # fmt: skip
    logger.debug("no job: {} {{braces}}", "é ✓")
    for job_id in ("ping-1-abc", 0, "", 17):
        with logger.contextualize(job_id=job_id):
            logger.warning("in job {}", job_id)
    logger.bind(job_id="j-2").opt(lazy=True).info("lazy {}", lambda: 42)
    logger.success("a level name longer than seven")
    try:
        raise ValueError("bad\nvalue ü")  # ü: a non-ASCII traceback, as utf8 renders it
    except ValueError:
        logger.opt(exception=True).error("failed")
    logging.getLogger("redis").error("from stdlib")
    flush_logs()
    assert out.getvalue() == reference.getvalue()
    assert out.getvalue().count("Traceback") == 1


def test_json_lines_are_those_the_old_sink_made(stderr_logging_after: None) -> None:
    from loguru import logger

    def old_json_line(message: Any) -> None:  # the old sink, minus redaction (no secrets here)
        record = message.record
        payload: dict[str, Any] = {
            "ts": record["time"].isoformat(timespec="milliseconds"),
            "level": record["level"].name,
            "message": record["message"],
        }
        payload.update(record["extra"])
        if record["exception"] is not None:
            exc = record["exception"]
            payload["error"] = f"{exc.type.__name__ if exc.type else 'Error'}: {exc.value}"
        reference.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")

    out, reference = io.StringIO(), io.StringIO()
    setup_logging("json", "DEBUG", stream=out)
    logger.add(old_json_line, level="DEBUG", backtrace=False, diagnose=False, catch=True)
    with logger.contextualize(job_id="j-1", job_name="ping", attempt=2):
        logger.info("picked up {}", "é")
        logger.bind(when=dt.date(2024, 5, 1), n=None).debug("with extras")
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("failed {}", 1)
    logging.getLogger("httpx").warning("from stdlib")
    flush_logs()
    assert out.getvalue() == reference.getvalue()
    assert len(out.getvalue().splitlines()) == 4


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_per_job_line_reads_as_the_same_line_through_loguru(log_format: str) -> None:
    # The loop's picked-up/completed lines skip loguru's record for speed; the stream must not
    # be able to tell.
    import io

    from loguru import logger

    from worker.logs import flush_logs, job_line, job_lines_on, setup_logging

    out = io.StringIO()
    setup_logging(log_format, "INFO", ["s3cret-token"], stream=out)
    assert job_lines_on()
    message = "Job picked up: 7 (ping) | Attempt: 2/3 | token s3cret-token"
    with logger.contextualize(job_id="7", job_name="ping", attempt=2):
        logger.info(message)
    job_line(message, "7", "ping", 2)
    flush_logs()
    assert out.getvalue().endswith("\n")
    via_loguru, direct = out.getvalue().splitlines()
    assert "s3cret-token" not in out.getvalue()
    if log_format == "json":
        a, b = json.loads(via_loguru), json.loads(direct)
        assert a.pop("ts")[:16] == b.pop("ts")[:16] and a == b
        assert list(b) == ["level", "message", "job_id", "job_name", "attempt"]
    else:
        assert via_loguru[:16] == direct[:16] and via_loguru[23:] == direct[23:]
    setup_logging(log_format, "WARNING", stream=io.StringIO())
    assert not job_lines_on()
