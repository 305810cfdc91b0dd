"""`stats --capacity`: rates read from BullMQ's own per-minute metrics, drain time, workers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.harness import registry_of, run_until_idle, running_service, settings_for
from tests.support.node_bridge import NodeBridge
from tests.test_cli import env_for, run_cli
from worker.capacity import MinuteCounts, capacity_report, parse_minutes

MINUTE = 60_000
NOW = 1_000 * MINUTE + 30_000  # half way through minute 1000


def counts(open_minute: int, open_count: int, closed: list[int]) -> MinuteCounts:
    return MinuteCounts(open_minute * MINUTE + 5_000, open_count, closed)


def test_the_open_minute_and_the_closed_ones_inside_the_window_count() -> None:
    c = counts(1000, 4, [10, 20, 30, 40, 50, 60])  # minutes 999, 998, ... newest first
    assert c.finished_within(1, NOW) == 4
    assert c.finished_within(5, NOW) == 4 + 10 + 20 + 30 + 40
    # Two idle minutes since the open one (no point pushed for them): they count as zeros.
    assert c.finished_within(5, NOW + 2 * MINUTE) == 4 + 10 + 20
    assert c.finished_within(5, NOW + 5 * MINUTE) == 0
    assert MinuteCounts.from_redis([None, None, None], []).finished_within(60, NOW) == 0


def test_bullmqs_stored_fields_are_read_as_it_writes_them() -> None:
    # collectMetrics: count is the running total, prevCount the total when prevTS's minute began.
    c = MinuteCounts.from_redis(["57", str(1000 * MINUTE + 1), "50"], ["9", "8"])
    assert (c.open_count, c.closed) == (7, [9, 8])


def test_the_report_says_how_long_and_how_many_workers() -> None:
    done = counts(1000, 10, [10, 10, 10, 10])  # 50 in 5 minutes: 10/min
    none = MinuteCounts(None, 0, [])
    report = capacity_report(done, none, backlog=300, workers=2, drain_within_min=10, now_ms=NOW)
    assert report["perMinute"]["5m"] == {"completed": 10.0, "failed": 0.0}
    assert report["drainMinutes"] == 30.0
    assert report["workersToDrainWithin"] == 6  # 5/min each, 300 in 10 min
    idle = capacity_report(none, none, backlog=0, workers=1, drain_within_min=10, now_ms=NOW)
    assert (idle["drainMinutes"], idle["metricsRecorded"]) == (0.0, False)
    stuck = capacity_report(none, none, backlog=5, workers=1, drain_within_min=10, now_ms=NOW)
    assert stuck["drainMinutes"] is None and stuck["workersToDrainWithin"] is None


@pytest.mark.parametrize(("text", "minutes"), [("10m", 10), ("90s", 1.5), ("1h", 60), ("3", 3)])
def test_drain_targets_read_as_durations(text: str, minutes: float) -> None:
    assert parse_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "ten", "-5m", "0"])
def test_bad_drain_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_minutes(text)


async def test_stats_capacity_reads_what_the_worker_recorded(
    node6: NodeBridge, redis_url: str, queue_name: str
) -> None:
    await node6.add_bulk(queue_name, [{"name": "ping", "data": {}} for _ in range(12)])
    settings = settings_for(redis_url, queue_name, WORKER_LIMITER_MAX=0)
    await run_until_idle(settings, registry_of())  # BullMQ's metrics recorded by our worker
    await node6.add_bulk(queue_name, [{"name": "ping", "data": {"sleepMs": 1}}] * 4)
    report = await _capacity(redis_url, queue_name, "--drain-within", "90s")
    assert report["metricsRecorded"] is True
    assert report["perMinute"]["5m"]["completed"] == pytest.approx(12 / 5)
    assert report["perMinute"]["60m"]["completed"] == pytest.approx(12 / 60)
    assert (report["backlog"], report["workers"], report["drainWithinMinutes"]) == (4, 0, 1.5)
    async with running_service(settings_for(redis_url, queue_name, WORKER_CONCURRENCY=1)):
        # The worker drains the 4 meanwhile; it is listed as Node's getWorkers() lists it.
        report = await _capacity(redis_url, queue_name)
    assert report["workers"] == 1 and report["drainWithinMinutes"] == 10


async def _capacity(redis_url: str, queue: str, *extra: str) -> dict[str, Any]:
    code, out = await run_cli(env_for(redis_url, queue), "stats", "--capacity", *extra)
    assert code == 0, out
    report: dict[str, Any] = json.loads(out.splitlines()[-1])["capacity"]
    return report
