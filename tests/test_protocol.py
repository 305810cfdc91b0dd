"""worker/protocol.py against the pinned bullmq: script files, key counts, argument positions.

A bullmq upgrade that renames a script, changes its KEYS or moves an argument fails here, by
name, in well under a second (no Redis needed): each call of ours is compared with what
bullmq's own `Scripts` sends for the same job at the same instant.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bullmq
import msgpack
import pytest
from bullmq.redis_connection import SCRIPT_DEFINITIONS, loadScript
from bullmq.scripts import Scripts

from worker.joblog import JobLog
from worker.protocol import (
    BULLMQ_VERSION,
    FINISH_WITH_LOGS_PRELUDE,
    SCRIPTS,
    ActiveJob,
    QueueProtocol,
    UndecodableJob,
    backoff_delay_ms,
    client_name,
    decode_job,
    stack_of,
    trace_of,
)
from worker.results import node_json
from worker.settings import Settings

COMMANDS = Path(bullmq.__file__).parent / "commands"
NOW = 1_764_500_000.123
TOKEN = "w1:7"


class Recorder:
    """Stands in for a registered script: records KEYS and ARGV, answers `reply`."""

    def __init__(self, reply: Any = None) -> None:
        self.calls: list[tuple[list[Any], list[Any]]] = []
        self.reply = reply

    async def __call__(self, keys: Any = (), args: Any = (), client: Any = None) -> Any:
        self.calls.append((list(keys), list(args)))
        return self.reply


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)


@pytest.fixture
def settings() -> Settings:
    return Settings.from_env({"WORKER_QUEUE": "q1", "WORKER_PREFIX": "pfx"})


@pytest.fixture
def ours(settings: Settings) -> Iterator[QueueProtocol]:
    proto = QueueProtocol(settings)
    recorders = {name: Recorder([] if "Locks" in name or "Stalled" in name else 0)
                 for name in SCRIPTS}  # fmt: skip
    proto.scripts = recorders  # type: ignore[assignment]
    proto.move_to_finished = recorders["moveToFinished"]  # type: ignore[assignment]
    yield proto


@pytest.fixture
def theirs(settings: Settings) -> Scripts:
    recorders: dict[str, Recorder] = {}

    class Commands(dict[str, Recorder]):
        def __missing__(self, name: str) -> Recorder:
            recorders[name] = Recorder([] if "Locks" in name or "Stalled" in name else 0)
            self[name] = recorders[name]
            return recorders[name]

    connection = SimpleNamespace(conn=None, commands=Commands())
    return Scripts(settings.prefix, settings.queue, connection)  # type: ignore[arg-type]


def wire(value: Any) -> bytes:
    """What redis-py sends for an argument: bytes as they are, anything else as str, UTF-8."""
    return value if isinstance(value, bytes) else str(value).encode()


def last(recorder: Any) -> tuple[list[bytes], list[bytes]]:
    """The last call's KEYS and ARGV as they go on the wire."""
    assert recorder.calls, "not called"
    keys, args = recorder.calls[-1]
    return [wire(k) for k in keys], [wire(a) for a in args]


def on_the_wire(call: tuple[list[Any], list[Any]]) -> tuple[list[bytes], list[bytes]]:
    keys, args = call
    return [wire(k) for k in keys], [wire(a) for a in args]


def job(**opts: Any) -> ActiveJob:
    return ActiveJob(id="42", name="ping", data={}, opts=opts, token=TOKEN, attempts_made=1)


def bullmq_job(j: ActiveJob, settings: Settings) -> SimpleNamespace:
    queue_opts: dict[str, Any] = {"limiter": settings.limiter,
                                  "lockDuration": settings.lock_duration_ms}  # fmt: skip
    if settings.metrics_max_data_points:  # Node's worker option `metrics: {maxDataPoints}`
        queue_opts["metrics"] = {"maxDataPoints": settings.metrics_max_data_points}
    return SimpleNamespace(
        id=j.id, opts=j.opts, attempts=j.opts.get("attempts", 1), attemptsMade=j.attempts_made,
        queue=SimpleNamespace(opts=queue_opts),
    )  # fmt: skip


# --- the files ---------------------------------------------------------------------------------


def test_the_pinned_bullmq_is_installed() -> None:
    assert importlib.metadata.version("bullmq") == BULLMQ_VERSION


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_script_exists_with_the_key_count_in_its_name(name: str) -> None:
    path = COMMANDS / SCRIPTS[name]
    assert path.is_file(), f"bullmq {BULLMQ_VERSION} has no {SCRIPTS[name]}"
    declared = int(re.fullmatch(r".+-(\d+)\.lua", SCRIPTS[name]).group(1))  # type: ignore[union-attr]
    header = path.read_text().split("]]", 1)[0]
    assert max(int(n) for n in re.findall(r"KEYS\[(\d+)\]", header)) == declared
    if name in SCRIPT_DEFINITIONS:  # bullmq's own loader agrees on the file
        assert SCRIPT_DEFINITIONS[name] == SCRIPTS[name]


# --- the calls, against bullmq's own -----------------------------------------------------------


async def test_move_to_active(ours: QueueProtocol, theirs: Scripts, settings: Settings) -> None:
    await ours.move_to_active(TOKEN)
    opts = {"lockDuration": settings.lock_duration_ms, "limiter": settings.limiter}
    await theirs.moveToActive(TOKEN, opts)
    assert last(ours.scripts["moveToActive"]) == last(theirs.commands["moveToActive"])


async def test_move_to_active_names_the_worker_as_node_does(settings: Settings) -> None:
    proto = QueueProtocol(settings, worker_name="replica-1")
    proto.scripts["moveToActive"] = recorder = Recorder()  # type: ignore[assignment]
    await proto.move_to_active(TOKEN)
    packed = msgpack.unpackb(last(recorder)[1][2])
    assert packed["name"] == "replica-1" and packed["token"] == TOKEN


def test_the_blocking_connection_is_named_as_nodes_worker_names_it(settings: Settings) -> None:
    # Node: `${prefix}:${Buffer.from(queue).toString('base64')}` + `:w:${name}` when named.
    assert client_name("bull", "ai-jobs") == "bull:YWktam9icw=="
    assert client_name("bull", "ai-jobs", "replica-1") == "bull:YWktam9icw==:w:replica-1"
    assert client_name("pfx", "colas-ñ") == "pfx:Y29sYXMtw7E="  # UTF-8 bytes, as Buffer.from
    assert QueueProtocol(settings, "r").client_name == "pfx:cTE=:w:r"


@pytest.mark.parametrize("remove", [True, False, 5, {"age": 3600, "count": 100}])
async def test_complete(
    ours: QueueProtocol, theirs: Scripts, settings: Settings, remove: Any
) -> None:
    j = job(attempts=3, removeOnComplete=remove)
    await ours.complete(j, {"ok": "ü"}, fetch_next=True)
    keys, args = on_the_wire(
        theirs.moveToCompletedArgs(bullmq_job(j, settings), {"ok": "ü"}, remove, TOKEN, True)
    )
    our_keys, our_args = last(ours.scripts["moveToFinished"])
    assert our_keys == keys
    assert our_args[:3] + our_args[4:7] == args[:3] + args[4:7]
    assert msgpack.unpackb(our_args[7]) == msgpack.unpackb(args[7])
    assert json.loads(our_args[3]) == json.loads(args[3])
    assert our_args[3] == node_json({"ok": "ü"}).encode()  # raw UTF-8, as JSON.stringify writes it


@pytest.mark.parametrize(("points", "packed"), [(None, 10_080), ("60", 60), ("0", "")])
async def test_finishing_records_bullmqs_metrics_as_a_node_worker_with_the_option(
    points: str | None, packed: Any
) -> None:
    env = {"WORKER_QUEUE": "q1", "WORKER_PREFIX": "pfx"}
    if points is not None:
        env["WORKER_METRICS_MAX_DATA_POINTS"] = points
    settings = Settings.from_env(env)
    ours = QueueProtocol(settings)
    ours.move_to_finished = recorder = Recorder()  # type: ignore[assignment]
    connection = SimpleNamespace(conn=None, commands={})
    theirs = Scripts(settings.prefix, settings.queue, connection)  # type: ignore[arg-type]
    for target in ("completed", "failed"):
        j = job(attempts=1)
        if target == "completed":
            await ours.complete(j, 1, fetch_next=False)
            expected = theirs.moveToCompletedArgs(bullmq_job(j, settings), 1, False, TOKEN, False)
        else:
            await ours.fail(j, "boom", "[]", fetch_next=False)
            fields = {"failedReason": "boom", "stacktrace": "[]"}
            expected = theirs.moveToFailedArgs(
                bullmq_job(j, settings), "boom", False, TOKEN, False, fields
            )
        keys, args = on_the_wire(expected)
        our_keys, our_args = last(recorder)
        assert our_keys[12] == keys[12] == f"pfx:q1:metrics:{target}".encode()
        assert msgpack.unpackb(our_args[7])["maxMetricsSize"] == packed
        assert msgpack.unpackb(our_args[7]) == msgpack.unpackb(args[7])


def test_the_finishing_script_is_bullmqs_own_after_the_job_log_lines(
    settings: Settings,
) -> None:
    proto = QueueProtocol(settings)
    source = proto.move_to_finished.script.script
    assert isinstance(source, str)
    assert source == FINISH_WITH_LOGS_PRELUDE + loadScript(SCRIPTS["moveToFinished"])
    # the lines go in ahead of everything of BullMQ's, in beyond-the-end KEYS and ARGV
    assert "KEYS[15]" in FINISH_WITH_LOGS_PRELUDE and "unpack(ARGV, 11)" in FINISH_WITH_LOGS_PRELUDE
    assert "KEYS[15]" not in source[len(FINISH_WITH_LOGS_PRELUDE) :]
    assert "ARGV[10]" not in source[len(FINISH_WITH_LOGS_PRELUDE) :]


@pytest.mark.parametrize("target", ["completed", "failed"])
async def test_job_log_lines_ride_on_the_finishing_call(
    ours: QueueProtocol, theirs: Scripts, settings: Settings, target: str
) -> None:
    j = job(attempts=3)
    log = JobLog(7, "Attempt 2/3 started")
    log.end("Attempt 2/3 done")
    fields = {"failedReason": "boom", "stacktrace": "[]"}
    if target == "completed":
        await ours.complete(j, 1, fetch_next=True, log=log)
        keys, args = on_the_wire(
            theirs.moveToCompletedArgs(bullmq_job(j, settings), 1, False, TOKEN, True)
        )
        args.append(b"")  # ARGV[9]: no fields
    else:
        await ours.fail(j, "boom", "[]", fetch_next=True, log=log)
        keys, args = on_the_wire(
            theirs.moveToFailedArgs(bullmq_job(j, settings), "boom", False, TOKEN, True, fields)
        )
    our_keys, our_args = last(ours.scripts["moveToFinished"])
    assert our_keys == [*keys, b"pfx:q1:42:logs"]
    assert our_args[:7] + our_args[8:9] == args[:7] + args[8:9]
    assert msgpack.unpackb(our_args[7]) == msgpack.unpackb(args[7])
    assert our_args[9:] == [b"7", b"Attempt 2/3 started", b"Attempt 2/3 done"]
    assert log.take() == []  # written once


async def test_fail_for_good(ours: QueueProtocol, theirs: Scripts, settings: Settings) -> None:
    j = job(attempts=1, removeOnFail={"age": 86400, "count": 500}, failParentOnFailure=True)
    await ours.fail(j, "boom", '["trace"]', fetch_next=False)
    fields = {"failedReason": "boom", "stacktrace": '["trace"]'}
    keys, args = on_the_wire(
        theirs.moveToFailedArgs(
            bullmq_job(j, settings), "boom", j.opts["removeOnFail"], TOKEN, False, fields
        )
    )
    our_keys, our_args = last(ours.scripts["moveToFinished"])
    assert our_keys == keys
    assert our_args[:7] + our_args[8:] == args[:7] + args[8:]
    assert msgpack.unpackb(our_args[7]) == msgpack.unpackb(args[7])


@pytest.mark.parametrize("lifo", [False, True])
async def test_retry_now(ours: QueueProtocol, theirs: Scripts, lifo: bool) -> None:
    j = job(attempts=3, lifo=lifo)
    await ours.retry(j, "boom", "[]", delay_ms=0)
    fields = {"failedReason": "boom", "stacktrace": "[]"}
    assert last(ours.scripts["retryJob"]) == on_the_wire(
        theirs.retryJobArgs(j.id, lifo, TOKEN, {"fieldsToUpdate": fields})
    )


async def test_retry_after_a_backoff(ours: QueueProtocol, theirs: Scripts) -> None:
    j = job(attempts=3, backoff={"type": "exponential", "delay": 2000})
    await ours.retry(j, "boom", "[]", delay_ms=4000)
    fields = {"failedReason": "boom", "stacktrace": "[]"}
    assert last(ours.scripts["moveToDelayed"]) == on_the_wire(
        theirs.moveToDelayedArgs(j.id, round(NOW * 1000), TOKEN, 4000, {"fieldsToUpdate": fields})
    )


async def test_park_is_a_delay_that_uses_no_attempt(ours: QueueProtocol, theirs: Scripts) -> None:
    # Deferred (an open breaker, a rate limit, a 429): bullmq's moveToDelayed with skipAttempt,
    # so the script leaves `atm` alone (ARGV[6] "1") and writes no fields.
    j = job(attempts=3)
    await ours.park(j, 2500)
    expected = theirs.moveToDelayedArgs(j.id, round(NOW * 1000), TOKEN, 2500, {"skipAttempt": True})
    assert last(ours.scripts["moveToDelayed"]) == on_the_wire(expected)
    assert expected[1][5] == "1"
    header = (COMMANDS / SCRIPTS["moveToDelayed"]).read_text().split("]]", 1)[0]
    assert re.search(r"ARGV\[6\]\s+skip attempt", header)


async def test_extend_locks(ours: QueueProtocol, theirs: Scripts, settings: Settings) -> None:
    await ours.extend_locks([("1", "w:1"), ("2", "w:2")])
    await theirs.extendJobLocks(["1", "2"], ["w:1", "w:2"], settings.lock_duration_ms)
    assert last(ours.scripts["extendLocks"]) == last(theirs.commands["extendLocks"])


async def test_move_stalled_jobs_to_wait(ours: QueueProtocol, theirs: Scripts) -> None:
    await ours.move_stalled_to_wait(1, 30_000)
    await theirs.moveStalledJobsToWait(1, 30_000)
    assert last(ours.scripts["moveStalledJobsToWait"]) == (
        last(theirs.commands["moveStalledJobsToWait"])
    )


async def test_update_progress(ours: QueueProtocol, theirs: Scripts) -> None:
    await ours.update_progress("42", {"step": 2})
    await theirs.updateProgress("42", {"step": 2})
    assert last(ours.scripts["updateProgress"]) == last(theirs.commands["updateProgress"])


async def test_move_to_wait_keys_follow_the_scripts_header(ours: QueueProtocol) -> None:
    # bullmq-python has no builder for this one: pin it to the KEYS the Lua file documents.
    await ours.move_to_wait("42", TOKEN)
    keys, args = last(ours.scripts["moveJobFromActiveToWait"])
    header = (COMMANDS / SCRIPTS["moveJobFromActiveToWait"]).read_text().split("]]", 1)[0]
    names = re.findall(r"KEYS\[\d+\]\s+(\w+) key", header)
    names = ["events" if name == "event" else name for name in names]  # the header's wording
    assert [key.decode().rsplit(":", 1)[1] for key in keys] == names
    assert args == [b"42", TOKEN.encode(), ours.key("42").encode()]
    assert re.findall(r"ARGV\[\d+\]\s+(.+)", header) == ["job id", "lock token", "job id key"]


# --- the job hash ------------------------------------------------------------------------------


def raw(**fields: str) -> dict[str, str]:
    base = {"name": "ping", "data": "{}", "opts": '{"attempts":3,"kl":5}', "timestamp": "1700"}
    base.update(fields)
    return base


def test_decode_reads_what_node_writes() -> None:
    decoded = decode_job(raw(atm="2", data='{"a":[1,"é"]}'), "7", TOKEN)
    assert isinstance(decoded, ActiveJob)
    assert decoded.data == {"a": [1, "é"]} and decoded.attempt == 3 and decoded.max_attempts == 3
    assert decoded.opts["keepLogs"] == 5  # short option names decoded as bullmq does
    assert decoded.timestamp == 1700


def test_decode_reads_nesting_deeper_than_pythons_recursion_limit() -> None:
    depth = 20_000
    decoded = decode_job(raw(data='{"a":' * depth + "1" + "}" * depth), "7", TOKEN)
    assert isinstance(decoded, ActiveJob)
    node, seen = decoded.data, 0
    while isinstance(node, dict):
        node, seen = node["a"], seen + 1
    assert seen == depth and node == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"data": "{not json"}, "data is not JSON"),
        ({"opts": "[1,2]"}, "opts is a JSON list, not an object"),
        ({"opts": "nope"}, "opts is not JSON"),
        ({"data": '{"a":"\udcff"}'}, "data is not UTF-8"),  # a byte that was not UTF-8
        ({"timestamp": "soon"}, "timestamp is not a number: 'soon'"),
        ({"atm": "x"}, "atm is not a number"),
    ],
)
def test_an_undecodable_job_says_what_could_not_be_decoded(
    fields: dict[str, str], reason: str
) -> None:
    decoded = decode_job(raw(**fields), "7", TOKEN)
    assert isinstance(decoded, UndecodableJob), decoded
    assert decoded.reason.startswith("Job data could not be decoded: ")
    assert reason in decoded.reason


def test_backoffs_are_bullmqs_built_in_ones() -> None:
    assert backoff_delay_ms({}, 1) == 0
    assert backoff_delay_ms({"backoff": 500}, 3) == 500
    assert backoff_delay_ms({"backoff": {"type": "fixed", "delay": 700}}, 2) == 700
    assert [backoff_delay_ms({"backoff": {"type": "exponential", "delay": 2000}}, n)
            for n in (1, 2, 3)] == [2000, 4000, 8000]  # fmt: skip
    with pytest.raises(ValueError, match="unknown backoff strategy 'jitter'"):
        backoff_delay_ms({"backoff": {"type": "jitter", "delay": 1}}, 1)


def test_only_the_protocol_module_imports_bullmq() -> None:
    import ast

    root = Path(__file__).resolve().parents[1]
    importers = set()
    for path in [*root.glob("worker/*.py"), *root.glob("processors/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            if any(name == "bullmq" or name.startswith("bullmq.") for name in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"worker/protocol.py"}


# --- the stored stacktrace -----------------------------------------------------------------------


def _parse(text: str) -> Any:
    return json.loads(text)  # a library frame (json), below ours


def _read_reply(text: str) -> Any:
    try:
        return _parse(text)
    except ValueError as exc:
        raise RuntimeError("the reply is not JSON") from exc


def _raised(fn: Any, *args: Any) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def test_a_trace_reads_as_nodes_reason_and_our_frames_first_then_causes() -> None:
    exc = _raised(_read_reply, "{nope")
    lines = trace_of(exc).splitlines()
    assert lines[0] == "RuntimeError: the reply is not JSON"
    assert (
        lines[1] == f"    at _read_reply (tests/test_protocol.py:{_line_of('raise RuntimeError')})"
    )
    assert lines[2].startswith("    at _raised (tests/test_protocol.py:")
    assert lines[3].startswith("Caused by: JSONDecodeError: Expecting property name")
    assert lines[3].endswith(f"(at _parse tests/test_protocol.py:{_line_of('return json.loads')})")
    assert len(lines) == 4  # json's own frames are not ours: not listed, no traceback text


def test_library_frames_are_counted_and_named_not_listed() -> None:
    exc = _raised(json.loads, "{nope")
    lines = trace_of(exc).splitlines()
    assert lines[0].startswith("JSONDecodeError: Expecting property name")
    assert lines[-1].startswith("    ... ") and "library frame(s) left out: json" in lines[-1]
    assert not any("site-packages" in line or "/json/" in line for line in lines)


def test_a_trace_stays_under_two_kilobytes() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise ValueError("x" * 10_000 + "\nsecond line")
        deep(n - 1)

    exc = _raised(deep, 200)
    trace = trace_of(exc)
    assert len(trace.encode()) <= 2048
    lines = trace.splitlines()
    assert lines[0].startswith("ValueError: xxx") and lines[0].endswith("…")
    assert lines[1].startswith("    at deep (")  # the innermost frame is kept
    assert lines[-1].startswith("    ... ") and lines[-1].endswith("more frame(s) of ours")


def test_stack_of_appends_one_entry_per_attempt_and_honours_stack_trace_limit() -> None:
    exc = _raised(_read_reply, "{nope")
    first = job(attempts=3)
    stored = stack_of(first, exc)
    second = ActiveJob(id="42", name="ping", data={}, opts={"stackTraceLimit": 1}, token=TOKEN,
                       stacktrace=stored)  # fmt: skip
    assert len(json.loads(stored)) == 1
    assert json.loads(stack_of(second, exc)) == json.loads(stored)  # the older one dropped
    assert json.loads(stack_of(job(stackTraceLimit=0), exc)) == []


def _line_of(text: str) -> int:
    source = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(source, 1) if text in line and "_line_of" not in line)
