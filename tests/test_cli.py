"""Operator commands: check, enqueue (like the web service), stats."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.support.harness import running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.proc import REPO_ROOT, WorkerProcess
from tests.support.redis_server import free_port, private_redis
from worker.results import node_json


def env_for(redis_url: str, queue: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "WORKER_QUEUE": queue, "WORKER_JOB_TYPES": "ping"}


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await WorkerProcess.start(env, *args)
    code = await proc.wait(timeout=60)
    return code, proc.output


async def test_check_says_fit_to_run(redis_url: str, queue_name: str) -> None:
    code, out = await run_cli(env_for(redis_url, queue_name), "check")
    assert code == 0, out
    assert "redis answers" in out and "processor ping" in out and "fit to run" in out


async def test_check_fails_when_redis_is_unreachable(queue_name: str) -> None:
    env = env_for(f"redis://127.0.0.1:{free_port()}", queue_name)
    code, out, took = await timed_cli(env, "check")
    assert code == 1
    assert "redis unreachable: connection refused by 127.0.0.1" in out and "NOT fit to run" in out
    assert took < 3, took  # was 5.6 s: redis-py's retries, cut by a 5 s wait


async def test_check_names_a_wrong_password_at_once(password_redis: str, queue_name: str) -> None:
    env = env_for(password_redis.replace("right-pass-123", "wrong-pass-456"), queue_name)
    code, out, took = await timed_cli(env, "check")
    assert code == 1
    assert "redis unreachable: authentication failed at 127.0.0.1" in out, out
    assert "check the user name and password in REDIS_URL" in out
    assert "wrong-pass-456" not in out and took < 3


def test_make_run_with_a_wrong_password_says_so_and_starts_no_redis(password_redis: str) -> None:
    wrong = password_redis.replace("right-pass-123", "wrong-pass-456")
    port = wrong.rsplit(":", 1)[1]
    done = subprocess.run(
        ["scripts/ensure-redis.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "REDIS_URL": wrong},
    )  # fmt: skip
    assert done.returncode == 1
    assert "authentication failed" in done.stderr and "REDIS_URL" in done.stderr, done.stderr
    assert "starting a private redis-server" not in done.stderr
    assert not (REPO_ROOT / ".run" / f"redis-{port}.pid").exists()


async def test_check_fails_when_the_health_port_is_taken(redis_url: str, queue_name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = await run_cli({**env_for(redis_url, queue_name), "PORT": str(port)}, "check")
    assert code == 1 and "NOT fit to run" in out
    assert f"[FAIL] PORT: health port {port} cannot be bound" in out, out


async def test_check_inside_a_running_service_accepts_its_own_health_port(
    redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)) as service:
        assert service.health is not None
        env = {**env_for(redis_url, queue_name), "WORKER_HEALTH_PORT": str(service.health.port)}
        code, out = await run_cli(env, "check")
    assert code == 0, out
    assert f"health port {service.health.port}: held by a running worker (pid " in out


async def test_check_names_a_missing_credential(redis_url: str, queue_name: str) -> None:
    env = {**env_for(redis_url, queue_name), "WORKER_JOB_TYPES": "ping,generate-flashcards"}
    code, out = await run_cli(env, "check")
    assert code == 1
    assert "OPENAI_API_KEY" in out


async def test_check_lists_every_problem_at_once(redis_url: str, queue_name: str) -> None:
    env = {
        **env_for(redis_url, queue_name), "SUPABASE_URL": "https://x.supabase.co",
        "WORKER_JOB_TYPES": "ping,generate-flashcards,generate-lesson", "OPENAI_TIMEOUT_S": "soon",
    }  # fmt: skip
    code, out = await run_cli(env, "check")
    assert code == 1 and "NOT fit to run" in out
    for job in ("generate-flashcards", "generate-lesson"):
        for variable in ("OPENAI_API_KEY", "OPENAI_TIMEOUT_S", "SUPABASE_SERVICE_ROLE_KEY"):
            assert f"[FAIL] processor {job}: {variable}: " in out, out
    assert "processor ping:" in out  # the processors that build are still listed


async def test_check_warns_of_a_misspelt_variable_naming_the_closest(
    redis_url: str, queue_name: str
) -> None:
    env = {**env_for(redis_url, queue_name), "WORKER_CONCURENCY": "50"}
    code, out = await run_cli(env, "check")
    assert code == 0, out  # a warning: the worker still runs, at the default concurrency
    expected = (
        "[warn] WORKER_CONCURENCY is not a setting of this worker and is ignored;"
        " did you mean WORKER_CONCURRENCY?"
    )
    assert expected in out, out


async def test_malformed_settings_are_all_named_at_once(queue_name: str) -> None:
    env = {"WORKER_QUEUE": queue_name, "WORKER_CONCURRENCY": "lots", "LOG_LEVEL": "loud",
           "REDIS_URL": "http://x:1", "PORT": "-1"}  # fmt: skip
    code, out = await run_cli(env, "check")
    assert code == 2
    for variable in ("WORKER_CONCURRENCY", "LOG_LEVEL", "REDIS_URL", "PORT"):
        assert f"Configuration error: {variable}: " in out, out


async def test_enqueue_wait_adds_like_the_web_service_and_prints_the_result(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)):
        code, out = await run_cli(
            env_for(redis_url, queue_name), "enqueue", "ping", "--data", '{"echo": "ñ"}', "--wait"
        )
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    added, final = lines[0], lines[-1]
    assert re.fullmatch(r"ping-\d{13}-[0-9a-z]{4,6}", added["jobId"])
    assert final["status"] == "completed" and final["result"]["echo"] == "ñ"
    job = await node6.get_job(queue_name, added["jobId"])
    assert job["opts"]["attempts"] == 3
    assert job["opts"]["backoff"] == {"type": "exponential", "delay": 2000}
    assert job["opts"]["removeOnComplete"] == {"age": 3600, "count": 100}


async def test_enqueue_of_an_unknown_type_says_how_to_send_it_anyway(
    redis_url: str, queue_name: str
) -> None:
    code, out = await run_cli(env_for(redis_url, queue_name), "enqueue", "translate-all")
    assert code == 2
    assert "Unknown job type: translate-all (use --no-validate to send it anyway)" in out, out


async def test_enqueue_refuses_an_invalid_payload(redis_url: str, queue_name: str) -> None:
    code, out = await run_cli(
        env_for(redis_url, queue_name), "enqueue", "ping", "--data", '{"sleepMs": -1}'
    )
    assert code == 2 and "sleepMs" in out


@pytest.mark.parametrize("bridge_version", ["5", "6"])
async def test_stats_prints_what_the_web_services_queue_stats_prints(
    bridges: dict[str, NodeBridge], bridge_version: str, redis_url: str, queue_name: str
) -> None:
    node = bridges[bridge_version]
    await node.add(queue_name, "ping", {})
    await node.add(queue_name, "ping", {}, opts={"delay": 60000})
    await node.add(queue_name, "ping", {}, opts={"priority": 5})  # in no shown key, in total
    code, out = await run_cli(env_for(redis_url, queue_name), "stats")
    assert code == 0, out
    line = out.splitlines()[-1]
    printed = json.loads(line)
    assert line == node_json(printed)  # compact, as Express's res.json writes it
    assert list(printed) == ["success", "stats", "timestamp"] and printed["success"] is True
    web = await node.web_stats(queue_name)
    assert list(printed["stats"].items()) == list(web.items())  # same keys, order and values
    assert (web["waiting"], web["delayed"], web["total"]) == (1, 1, 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", printed["timestamp"])
    code, out = await run_cli(env_for(redis_url, queue_name), "stats", "--all")
    assert code == 0, out
    every = json.loads(out.splitlines()[-1])
    assert every["backlog"] == 2  # waiting 1 + prioritized 1
    assert every["counts"]["prioritized"] == 1 and sum(every["counts"].values()) == web["total"]


async def test_enqueue_wait_prints_one_compact_json_object_per_line(
    redis_url: str, queue_name: str
) -> None:
    async with running_service(settings_for(redis_url, queue_name)):
        code, out = await run_cli(
            env_for(redis_url, queue_name), "enqueue", "ping", "--data", '{"echo": "ñ"}', "--wait"
        )
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 2, out
    for line in lines:
        assert line == node_json(json.loads(line)), line
    assert [json.loads(line)["status"] for line in lines] == ["added", "completed"]


async def test_check_prints_the_limiter_in_words(redis_url: str, queue_name: str) -> None:
    code, out = await run_cli(env_for(redis_url, queue_name), "check")
    assert code == 0, out
    assert "limiter 10 jobs per 1000 ms (queue-wide)" in out and "{'max'" not in out


async def test_an_evicting_redis_is_warned_about_once_as_a_log_line(queue_name: str) -> None:
    with private_redis() as url:
        with redis.Redis.from_url(url) as client:
            client.config_set("maxmemory-policy", "allkeys-lru")
        env = env_for(url, queue_name)
        code, out = await run_cli(env, "enqueue", "ping", "--wait", "--timeout", "1")
    assert code == 1, out  # nobody consumes: the wait times out
    assert out.count("allkeys-lru") == 1, out
    assert re.search(r"\| WARNING \| Redis maxmemory-policy is allkeys-lru", out), out
    assert "UserWarning" not in out and "IMPORTANT!" not in out


# --- bounded in time, with the cause ------------------------------------------------------------


@pytest.fixture(scope="module")
def password_redis() -> Iterator[str]:
    with private_redis(password="right-pass-123") as url:
        yield url


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


async def timed_cli(env: dict[str, str], *args: str, limit_s: float = 20) -> tuple[int, str, float]:
    """Run the CLI; kill it if it outlives `limit_s` (a hang is a failure, not a stuck suite)."""
    began = time.monotonic()
    proc = await WorkerProcess.start(env, *args)
    try:
        code = await proc.wait(timeout=limit_s)
    except TimeoutError:
        await proc.kill()
        raise AssertionError(f"{args} still running after {limit_s} s:\n{proc.output}") from None
    return code, proc.output, time.monotonic() - began


COMMANDS = [["stats"], ["enqueue", "ping"], ["enqueue", "ping", "--wait"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_a_wrong_password_fails_the_command_at_once_saying_so(
    command: list[str], password_redis: str, queue_name: str
) -> None:
    env = env_for(password_redis.replace("right-pass-123", "wrong-pass-456"), queue_name)
    code, out, took = await timed_cli(env, *command)
    assert code == 1, out
    assert "authentication failed" in out and "REDIS_URL" in out, out
    assert "wrong-pass-456" not in out and "right-pass-123" not in out
    assert took < 5, took


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_a_closed_port_fails_the_command_at_once_saying_so(
    command: list[str], queue_name: str
) -> None:
    code, out, took = await timed_cli(env_for(f"redis://127.0.0.1:{free_port()}", queue_name),
                                      *command)  # fmt: skip
    assert code == 1, out
    assert "connection refused by 127.0.0.1" in out, out
    assert took < 5, took


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_a_redis_that_never_answers_fails_the_command_within_its_timeout(
    command: list[str], silent_port: int, queue_name: str
) -> None:
    env = {**env_for(f"redis://127.0.0.1:{silent_port}", queue_name), "WORKER_CLI_TIMEOUT_S": "1"}
    code, out, took = await timed_cli(env, *command)
    assert code == 1, out
    assert f"no answer from 127.0.0.1:{silent_port} within 1 s" in out, out
    assert took < 4, took
    # The option wins over the variable.
    code, out, took = await timed_cli(env, *command, "--redis-timeout", "0.5")
    assert code == 1 and "within 0.5 s" in out, out


# --- a newcomer's first run ---------------------------------------------------------------------


def test_make_run_installs_the_runtime_only() -> None:
    def dry_run(target: str) -> str:
        done = subprocess.run(["make", "-n", "-B", target], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True)  # fmt: skip
        return done.stdout

    assert "-r requirements.lock" in dry_run("run")
    assert "requirements-dev.lock" not in dry_run("run")
    assert "-r requirements-dev.lock" in dry_run("install")  # tests and lint get the tools


async def test_a_fresh_clone_without_credentials_is_pointed_at_ping(queue_name: str) -> None:
    proc = await WorkerProcess.start({"WORKER_QUEUE": queue_name, "WORKER_HEALTH_PORT": "0"})
    code = await proc.wait(timeout=30)
    assert code == 2, proc.output
    assert "OPENAI_API_KEY" in proc.output
    assert "WORKER_JOB_TYPES=ping WORKER_QUEUE=dev-<you> make run" in proc.output


def test_try_it_runs_both_terminals_on_a_dev_queue() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("Try it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    for command in commands:
        assert "WORKER_QUEUE=dev-" in command, command
    assert "WORKER_JOB_TYPES=ping" in commands[0] and "make run" in commands[0]


def test_a_private_redis_is_started_with_word_on_how_to_stop_it() -> None:
    port = free_port()
    done = subprocess.run(
        ["scripts/ensure-redis.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "REDIS_URL": f"redis://127.0.0.1:{port}"},
    )  # fmt: skip
    pidfile = REPO_ROOT / ".run" / f"redis-{port}.pid"
    try:
        assert done.returncode == 0, done.stderr
        assert "starting a private redis-server" in done.stderr
        assert "stop it with: make stop-redis" in done.stderr, done.stderr
    finally:
        if pidfile.exists():  # only the server this test started
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            pidfile.unlink()
        (REPO_ROOT / ".run" / f"redis-{port}.log").unlink(missing_ok=True)
