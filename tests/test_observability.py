"""What the tools operators already use read from this worker, read the way they read it: Node
bullmq's own `queue.getWorkers()`, `getJobLogs()`, `getMetrics()` and `getJob()` (5.61 and 6.x),
which are what Bull Board and Taskforce call (issue 13)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from processors import generate_flashcards as gf
from tests.fakes.fixtures import stand_ins, users_table
from tests.fakes.openai_server import completion
from tests.support.harness import eventually, registry_of, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.support.redis_server import private_redis
from worker.context import JobContext
from worker.contract import Contract
from worker.errors import ConfigError
from worker.registry import ProcessorSpec
from worker.service import Service
from worker.settings import parse_provider_prices


async def test_get_workers_lists_the_running_worker_once(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    assert await node.get_workers(queue_name) == []
    async with running_service(settings_for(redis_url, queue_name)):
        workers = await node.get_workers(queue_name)
        # Idle (blocked on the marker) and busy alike: the same one connection is listed.
        await node.add(queue_name, "ping", {})
        busy = await node.get_workers(queue_name)
    assert [w["name"] for w in workers] == [queue_name]
    assert busy == workers
    assert await node.get_workers(queue_name) == []  # gone with the worker


async def test_get_workers_shows_the_name_as_for_a_named_node_worker(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    await node.start_worker(queue_name, name="node-1")
    try:
        settings = settings_for(redis_url, queue_name, WORKER_NAME="py-1")
        async with running_service(settings):
            workers = await node.get_workers(queue_name)
    finally:
        await node.stop_worker(queue_name)
    raw = sorted(w["rawname"] for w in workers)
    assert len(raw) == 2, workers
    node_raw, py_raw = raw
    assert node_raw.endswith(":w:node-1") and py_raw.endswith(":w:py-1")
    assert node_raw.removesuffix("node-1") == py_raw.removesuffix("py-1")  # same form as Node's


async def _wait_listed(node: NodeBridge, queue: str, count: int) -> list[dict[str, str]]:
    async def listed() -> list[dict[str, str]] | None:
        workers = await node.get_workers(queue)
        return workers if len(workers) == count else None

    result: list[dict[str, str]] = await eventually(listed, timeout=10)
    return result


async def test_a_worker_whose_connection_dropped_is_listed_again(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any
) -> None:
    async with running_service(settings_for(redis_url, queue_name, WORKER_NAME="py-2")):
        (before,) = await _wait_listed(node6, queue_name, 1)
        clients = await rclient.client_list()
        (mine,) = [c for c in clients if c.get("name") == before["rawname"]]
        await rclient.client_kill_filter(_id=mine["id"])
        await asyncio.sleep(0.2)
        await node6.add(queue_name, "ping", {})
        (after,) = await _wait_listed(node6, queue_name, 1)
    assert after["rawname"] == before["rawname"]


async def test_completions_and_failures_reach_bullmqs_metrics_and_name_the_worker(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_NAME="py-metrics")
    async with running_service(settings):
        done = [await node.add(queue_name, "ping", {}) for _ in range(3)]
        bad = await node.add(queue_name, "no-such-type", {})
        jobs = [await node.wait_finished(queue_name, a["id"]) for a in [*done, bad]]
    assert [j["state"] for j in jobs] == ["completed"] * 3 + ["failed"]
    assert {j["processedBy"] for j in jobs} == {"py-metrics"}  # Job.processedBy, as Node sets it
    completed = await node.get_metrics(queue_name, "completed")
    failed = await node.get_metrics(queue_name, "failed")
    assert completed["meta"]["count"] == 3 and failed["meta"]["count"] == 1
    text = await node.export_prometheus_metrics(queue_name)
    assert f'bullmq_job_count{{queue="{queue_name}", state="completed"}} 3' in text


async def test_bullmq_metrics_can_be_turned_off(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_METRICS_MAX_DATA_POINTS=0)
    async with running_service(settings):
        added = await node6.add(queue_name, "ping", {})
        await node6.wait_finished(queue_name, added["id"])
    assert (await node6.get_metrics(queue_name, "completed"))["meta"]["count"] == 0


async def _broken_reply(payload: dict[str, Any], ctx: JobContext) -> Any:
    try:
        return json.loads("{ not json")  # library frames below ours
    except ValueError as exc:
        raise RuntimeError("OpenAI reply is not JSON") from exc


async def test_a_failed_attempt_stores_a_short_trace_reason_first(
    node: NodeBridge, redis_url: str, queue_name: str
) -> None:
    registry = registry_of(ProcessorSpec("broken", _broken_reply))
    async with running_service(settings_for(redis_url, queue_name), registry):
        added = await node.add(queue_name, "broken", {}, {"attempts": 2, "backoff": 0})
        job = await node.wait_finished(queue_name, added["id"])
    assert job["state"] == "failed" and job["attemptsMade"] == 2
    assert job["failedReason"] == "OpenAI reply is not JSON"
    assert len(job["stacktrace"]) == 2  # one entry per attempt, as Node keeps them
    for trace in job["stacktrace"]:
        lines = trace.splitlines()
        assert len(trace.encode()) <= 2048
        assert lines[0] == "RuntimeError: OpenAI reply is not JSON"
        assert lines[1].startswith("    at _broken_reply (tests/test_observability.py:")
        assert any(line.startswith("Caused by: JSONDecodeError: ") for line in lines)
        assert "Traceback" not in trace and "site-packages" not in trace


# --- job logs ------------------------------------------------------------------------------------

SECRET = "sk-test-observe-9f8e7d6c5b4a"


async def _chatty(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    ctx.log.debug("debug lines stay out of the job log")
    ctx.log.info("Generating {} cards for {user}", 3, user="u-1")
    ctx.log.warning("Calling OpenAI with key {}", os.environ["OPENAI_API_KEY"])
    if payload.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError("upstream hiccup")
    for n in range(payload.get("lines", 0)):
        ctx.log.info("line {}", n)
    return {"ok": True}


def _chatty_registry() -> Any:
    return registry_of(ProcessorSpec("chatty", _chatty))


async def test_job_logs_hold_each_attempt_and_the_processors_lines_without_secrets(
    node: NodeBridge, redis_url: str, queue_name: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    settings = settings_for(redis_url, queue_name, WORKER_NAME="py-logs")
    async with running_service(settings, _chatty_registry()):
        added = await node.add(queue_name, "chatty", {"fail_first": True}, {"backoff": 0})
        job = await node.wait_finished(queue_name, added["id"])
    assert job["state"] == "completed" and job["attemptsMade"] == 2
    logs = await node.get_job_logs(queue_name, added["id"])
    lines = logs["logs"]
    assert logs["count"] == len(lines) == 8, lines
    started = f"started (worker py-logs, pid {os.getpid()})"
    assert lines[0] == f"Attempt 1/3 {started}"
    assert lines[1:3] == [
        "INFO: Generating 3 cards for u-1",
        "WARNING: Calling OpenAI with key ***",
    ]
    assert re.fullmatch(
        r"Attempt 1/3 failed: RuntimeError: upstream hiccup; retried in 0 ms after \d+ ms",
        lines[3],
    )
    assert lines[4] == f"Attempt 2/3 {started}"
    assert re.fullmatch(r"Attempt 2/3 completed after \d+ ms", lines[7])
    assert SECRET not in "".join(lines)


async def test_job_logs_keep_the_jobs_keep_logs_lines(
    node6: NodeBridge, redis_url: str, queue_name: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    async with running_service(settings_for(redis_url, queue_name), _chatty_registry()):
        opts = {"keepLogs": 4, "backoff": 0}
        added = await node6.add(queue_name, "chatty", {"fail_first": True, "lines": 20}, opts)
        await node6.wait_finished(queue_name, added["id"])
        default = await node6.add(queue_name, "chatty", {"lines": 500}, {})
        await node6.wait_finished(queue_name, default["id"])
    logs = await node6.get_job_logs(queue_name, added["id"])
    assert logs["count"] == 4  # trimmed as job.log trims: the last keepLogs lines
    assert logs["logs"][-2] == "(20 line(s) left out: more than keepLogs)"
    assert logs["logs"][-1].startswith("Attempt 2/3 completed after ")
    lines = (await node6.get_job_logs(queue_name, default["id"]))["logs"]
    assert len(lines) == 100 and lines[-1].startswith("Attempt 1/3 completed")  # the default


async def test_a_job_removed_on_completion_leaves_no_log_behind(
    node6: NodeBridge, redis_url: str, queue_name: str, rclient: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    async with running_service(settings_for(redis_url, queue_name), _chatty_registry()):
        added = await node6.add(queue_name, "chatty", {}, {"removeOnComplete": True})
        kept = await node6.add(queue_name, "chatty", {}, {})
        await node6.wait_finished(queue_name, kept["id"])
    assert await rclient.exists(f"bull:{queue_name}:{added['id']}") == 0
    assert await rclient.exists(f"bull:{queue_name}:{added['id']}:logs") == 0
    assert await rclient.llen(f"bull:{queue_name}:{kept['id']}:logs") == 4


async def test_lines_logged_before_a_progress_update_are_readable_while_it_runs(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    release = asyncio.Event()

    async def stepwise(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        ctx.log.info("step 1 done")
        await ctx.progress(50)
        await release.wait()
        return {}

    registry = registry_of(ProcessorSpec("stepwise", stepwise))
    async with running_service(settings_for(redis_url, queue_name), registry):
        added = await node6.add(queue_name, "stepwise", {})

        async def logged() -> list[str] | None:
            lines: list[str] = (await node6.get_job_logs(queue_name, added["id"]))["logs"]
            return lines if len(lines) == 2 else None

        lines = await eventually(logged, timeout=10)
        release.set()
        await node6.wait_finished(queue_name, added["id"])
    assert lines[0].startswith("Attempt 1/3 started") and lines[1] == "INFO: step 1 done"
    final = (await node6.get_job_logs(queue_name, added["id"]))["logs"]
    assert final[:2] == lines and final[2].startswith("Attempt 1/3 completed")


# --- Prometheus ----------------------------------------------------------------------------------

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def _scrape(port: int) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            return response.headers["Content-Type"], await response.text()


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    family_name = re.sub(r"_(total|bucket|count|sum)$", "", sample_name)
    family = families.get(family_name) or families[sample_name]
    found = [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample_name, labels, family.samples)
    return float(found[0])


async def test_metrics_read_by_prometheus_clients_parser(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    release = asyncio.Event()

    async def held(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with stand_ins(users_table(FLASHCARDS_USER)) as fakes:
        fakes.openai.script(completion(FLASHCARD, prompt_tokens=900, completion_tokens=600))
        registry = registry_of(
            ProcessorSpec("broken", _broken_reply), ProcessorSpec("held", held),
        )  # fmt: skip
        registry.register(gf.build(fakes.env))
        async with running_service(settings_for(redis_url, queue_name), registry) as service:
            port = service.health.port
            ids = [(await node6.add(queue_name, name, data, opts))["id"] for name, data, opts in (
                ("ping", {}, {}), ("ping", {}, {}), ("broken", {}, {"attempts": 2, "backoff": 0}),
                (gf.JOB_NAME, _flashcards_payload(), {}),
            )]  # fmt: skip
            for job_id in ids:
                await node6.wait_finished(queue_name, job_id)
            await node6.add(queue_name, "held", {})
            await node6.add(queue_name, "ping", {}, {"delay": 60_000})
            await eventually(lambda: _active_is(node6, queue_name, 1))
            content_type, text = await _scrape(port)
            counts = await node6.counts(queue_name)
            release.set()
    assert content_type == PROMETHEUS_TEXT
    families = _families(text)
    assert all(family.documentation for family in families.values()), [
        name for name, family in families.items() if not family.documentation
    ]
    q = {"queue": queue_name}
    assert _value(families, "worker_jobs_total", **q, job_type="ping", outcome="completed") == 2
    assert _value(families, "worker_jobs_total", **q, job_type="broken", outcome="retry") == 1
    assert _value(families, "worker_jobs_total", **q, job_type="broken", outcome="failed") == 1
    assert families["worker_job_duration_seconds"].type == "histogram"
    assert _value(families, "worker_job_duration_seconds_count", **q, job_type="ping") == 2
    assert _value(families, "worker_job_duration_seconds_bucket", **q, job_type="ping",
                  le="+Inf") == 2  # fmt: skip
    assert _value(families, "worker_job_wait_seconds_count", **q, job_type="broken") == 1
    for state in ("waiting", "active", "completed", "failed", "delayed", "prioritized", "paused",
                  "waiting-children"):  # fmt: skip
        expected = counts.get(state, 0)  # bullmq 6 has no `paused` state: 0 in ours too
        assert _value(families, "worker_queue_jobs", **q, state=state) == expected, state
    assert counts["active"] == 1 and counts["delayed"] == 1
    assert _value(families, "worker_jobs_in_flight", **q) == 1
    assert _value(families, "worker_redis_up", **q) == 1
    assert _value(families, "worker_queue_paused", **q) == 0
    flashcards = {**q, "job_type": gf.JOB_NAME, "model": "gpt-4o-mini"}
    assert _value(families, "worker_ai_tokens_total", **flashcards, kind="input") == 900
    assert _value(families, "worker_ai_tokens_total", **flashcards, kind="output") == 600
    cost = _value(families, "worker_ai_cost_usd_total", **flashcards)
    assert cost == pytest.approx((900 * 0.60 + 600 * 2.40) / 1e6)
    assert "process_cpu_seconds" in families and "python_info" in families
    assert "python_gc_collections" in families
    promtool = shutil.which("promtool")
    if promtool:  # Debian's `prometheus` package; where it is installed, lint as an operator would
        lint = await asyncio.create_subprocess_exec(
            promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        said, _ = await lint.communicate(text.encode())
        assert lint.returncode == 0, said.decode()


async def test_metrics_still_answer_without_redis(queue_name: str) -> None:
    with private_redis() as url:
        settings = settings_for(url, queue_name, WORKER_SHUTDOWN_GRACE_S=1)
        service = Service(settings, registry_of(), Contract.load())
        await service.start()
    try:
        _, text = await _scrape(service.health.port)
    finally:
        await asyncio.wait_for(service.stop(), timeout=15)
    families = _families(text)
    assert _value(families, "worker_redis_up", queue=queue_name) == 0
    assert "worker_queue_jobs" not in families and "process_cpu_seconds" in families


async def test_ai_prices_are_configurable(redis_url: str, queue_name: str) -> None:
    settings = settings_for(redis_url, queue_name, WORKER_AI_PRICES="gpt-4o=2.5/10,*=1/2")
    async with running_service(settings) as service:
        service.metrics.ai_usage("lesson", "gpt-4o", 1_000_000, 100_000)
        service.metrics.ai_usage("lesson", "other", 1_000_000, 1_000_000)
        _, text = await _scrape(service.health.port)
    families = _families(text)
    cost = "worker_ai_cost_usd_total"
    assert _value(families, cost, job_type="lesson", model="gpt-4o") == pytest.approx(3.5)
    assert _value(families, cost, job_type="lesson", model="other") == pytest.approx(3.0)


async def test_provider_prices_are_configurable(redis_url: str, queue_name: str) -> None:
    settings = settings_for(
        redis_url, queue_name, WORKER_PROVIDER_PRICES="polly:characters-neural=0.00002,x:y=1"
    )
    async with running_service(settings) as service:
        usd = service.metrics.provider_usage("audio", "polly", "characters-neural", 1500)
        default = service.metrics.provider_usage("audio", "polly", "characters-standard", 1000)
        unpriced = service.metrics.provider_usage("audio", "polly", "requests", 3)
        _, text = await _scrape(service.health.port)
    assert usd == pytest.approx(0.03) and default == pytest.approx(0.004) and unpriced == 0
    families = _families(text)
    units = "worker_provider_usage_total"
    assert _value(families, units, provider="polly", unit="characters-neural") == 1500
    assert _value(families, units, provider="polly", unit="requests") == 3
    cost = "worker_provider_cost_usd_total"
    assert _value(families, cost, provider="polly", job_type="audio") == pytest.approx(0.034)


def test_provider_prices_refuse_a_bad_entry() -> None:
    with pytest.raises(ConfigError, match="WORKER_PROVIDER_PRICES"):
        parse_provider_prices("polly=3")
    with pytest.raises(ConfigError, match="WORKER_PROVIDER_PRICES"):
        parse_provider_prices("polly:characters-neural=-1")


async def _active_is(node: NodeBridge, queue: str, n: int) -> bool:
    return (await node.counts(queue))["active"] == n


FLASHCARDS_USER = "0b6f3c2e-8d4a-4f1b-9c7e-2a5d8e1f4b60"
FLASHCARD = {
    "flashcards": [{"front": "heart", "back": "corazón", "topic": "Cardiology",
                    "difficulty": "beginner", "example": "The heart beats.",
                    "pronunciation": "/hɑːrt/"}]
}  # fmt: skip


def _flashcards_payload() -> dict[str, Any]:
    return {
        "content": f"Cardiology basics {uuid.uuid4().hex}: the heart pumps blood.",
        "subject": "Medicine", "topic": "Cardiology", "userId": FLASHCARDS_USER,
        "nativeLanguage": "Spanish", "targetLanguage": "English",
    }  # fmt: skip


async def test_the_readmes_alert_rules_are_valid_prometheus_rules(tmp_path: Any) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("Two alert rules worth having:")[1].split("```yaml")[1].split("```")[0]
    rules = tmp_path / "rules.yml"
    indented = "\n".join(f"    {line}" if line.strip() else line for line in block.splitlines())
    rules.write_text(f"groups:\n  - name: worker\n    rules:\n{indented}\n")
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "rules", str(rules), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    said, _ = await check.communicate()
    assert check.returncode == 0 and b"SUCCESS: 2 rules found" in said, said.decode()
