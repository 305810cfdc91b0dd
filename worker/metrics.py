"""/metrics: what Prometheus scrapes, written by `prometheus_client` from a registry of this
service's own (not the library's global one, so one process can hold many services: tests).

Per job, counted as it happens: jobs by queue, job type and outcome; attempt duration and
queue wait (enqueue -> start) histograms by job type; AI tokens and their estimated cost by
model and job type; other providers' billed units (images read, characters synthesised, audio
seconds assessed) and their estimated cost by provider and job type. Read at scrape time:
BullMQ's job counts by state, the queue's paused and rate-limited state (one pipelined round
trip to Redis), the in-flight jobs, and the standard `process_*` and `python_*` collectors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# The states `queue.getJobCounts()` reports (and BullMQ's own exportPrometheusMetrics).
QUEUE_STATES = (
    "active", "completed", "delayed", "failed", "paused", "prioritized", "waiting",
    "waiting-children",
)  # fmt: skip
# Seconds: no-op jobs take milliseconds, OpenAI jobs 10-20 s, the job timeout is 600 s.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.01, 0.05, 0.25, 1, 5, 15, 30, 60, 120, 300, 900, 3600)
OUTCOMES = ("completed", "failed", "retry", "requeued")
# The classic text format, which every Prometheus (2.x too) and agent reads; prometheus_client
# 0.26 labels its output 1.0.0, the same text for names that need no escaping (all of ours).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class QueueSnapshot:
    """What the scrape read from Redis (`QueueProtocol.snapshot`)."""

    counts: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    rate_limited_ms: int = 0


class QueueMetrics:
    """One queue's per-job series (the `queue` label); the counters are the service's."""

    def __init__(self, metrics: Metrics, queue: str) -> None:
        self.queue = queue
        self._m = metrics
        self._per_type: dict[str, tuple[Any, Any, dict[str, Any]]] = {}

    # -- per job (the hot path: a dict lookup, an increment and an observation) ------------------

    def _children(self, job_type: str) -> tuple[Any, Any, dict[str, Any]]:
        children = self._per_type.get(job_type)
        if children is None:
            m = self._m
            outcomes = {o: m.jobs.labels(self.queue, job_type, o) for o in OUTCOMES}
            children = (
                m.duration.labels(self.queue, job_type),
                m.wait.labels(self.queue, job_type),
                outcomes,
            )
            self._per_type[job_type] = children
        return children

    def job_started(self, job_type: str, waited_s: float | None) -> None:
        if waited_s is not None:
            self._children(job_type)[1].observe(max(waited_s, 0.0))

    def job_ended(self, job_type: str, outcome: str, duration_s: float) -> None:
        duration, _, outcomes = self._children(job_type)
        duration.observe(duration_s)
        outcomes[outcome].inc()

    def ai_usage(self, job_type: str, model: str, input_tokens: int, output_tokens: int) -> None:
        """What a processor reports after each billed AI call (`ctx.ai_usage`)."""
        m = self._m
        given, output = m.prices.get(model) or m.prices["*"]
        m.tokens.labels(self.queue, model, job_type, "input").inc(max(input_tokens, 0))
        m.tokens.labels(self.queue, model, job_type, "output").inc(max(output_tokens, 0))
        usd = (max(input_tokens, 0) * given + max(output_tokens, 0) * output) / 1_000_000
        m.cost.labels(self.queue, model, job_type).inc(usd)

    def provider_usage(self, job_type: str, provider: str, unit: str, amount: float) -> float:
        """What a processor reports after each billed call (`ctx.provider_usage`): the units
        counted and their estimated cost, which the processor puts in its log line."""
        m = self._m
        amount = max(float(amount), 0.0)
        usd = amount * m.unit_prices.get((provider, unit), 0.0)
        m.provider_units.labels(self.queue, provider, job_type, unit).inc(amount)
        m.provider_cost.labels(self.queue, provider, job_type).inc(usd)
        return usd


class Metrics(QueueMetrics):
    """The service's metrics; `render()` is the /metrics body. Itself the per-job series of its
    first queue; `for_queue` gives those of every other queue the service consumes."""

    def __init__(
        self,
        queue: str,
        in_flight: Callable[[], float],
        prices: Iterable[tuple[str, float, float]] = (("*", 0.60, 2.40),),
        draining: Callable[[], float] = lambda: 0.0,
        provider_prices: Iterable[tuple[str, str, float]] = (),
    ) -> None:
        super().__init__(self, queue)
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.jobs = Counter(
            "worker_jobs",
            "Job attempts ended, by outcome: completed; failed (for good: not retryable or "
            "no attempts left); retry (failed, will run again); requeued (back to waiting "
            "without using an attempt: parked for a provider, or shutdown)",
            ["queue", "job_type", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "worker_job_duration_seconds",
            "Time one attempt ran, from pick-up to its outcome being recorded",
            ["queue", "job_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            "worker_job_wait_seconds",
            "Time a job waited in the queue before its first attempt started (from its "
            "timestamp, plus its delay)",
            ["queue", "job_type"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "worker_ai_tokens",
            "AI tokens billed, by model, job type and kind (input, output)",
            ["queue", "model", "job_type", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "worker_ai_cost_usd",
            "Estimated cost of the AI tokens billed, in USD (prices: WORKER_AI_PRICES)",
            ["queue", "model", "job_type"],
            registry=r,
        )
        self.provider_units = Counter(
            "worker_provider_usage",
            "Units billed by a provider other than the AI tokens, by provider, job type and "
            "unit (images, characters-standard, characters-neural, audio-seconds)",
            ["queue", "provider", "job_type", "unit"],
            registry=r,
        )
        self.provider_cost = Counter(
            "worker_provider_cost_usd",
            "Estimated cost of those units, in USD (prices: WORKER_PROVIDER_PRICES)",
            ["queue", "provider", "job_type"],
            registry=r,
        )
        self._in_flight = Gauge(
            "worker_jobs_in_flight", "Jobs this process runs now", ["queue"], registry=r
        )
        self._in_flight.labels(queue).set_function(in_flight)
        Gauge(
            "worker_draining", "1 while shutting down (not taking jobs)", registry=r
        ).set_function(draining)
        self.prices = {model: (given, output) for model, given, output in prices}
        self.unit_prices = {(provider, unit): usd for provider, unit, usd in provider_prices}
        self._queue_collector = _QueueCollector([queue])
        r.register(self._queue_collector)

    def for_queue(self, queue: str, in_flight: Callable[[], float]) -> QueueMetrics:
        """The per-job series of `queue` (the first queue's are this object's own), with its
        in-flight gauge and queue gauges."""
        if queue == self.queue:
            return self
        self._in_flight.labels(queue).set_function(in_flight)
        self._queue_collector.queues.append(queue)
        return QueueMetrics(self, queue)

    # -- the scrape ------------------------------------------------------------------------------

    async def render(
        self,
        snapshots: Mapping[str, Callable[[], Awaitable[QueueSnapshot]]],
        timeout_s: float = 2.0,
    ) -> bytes:
        """The exposition text; each queue's gauges read now by `snapshots[queue]` (absent when
        Redis does not answer within `timeout_s`, with `worker_redis_up 0`)."""
        names = list(snapshots)
        read = await asyncio.gather(
            *(asyncio.wait_for(snapshots[name](), timeout_s) for name in names),
            return_exceptions=True,  # a scrape must still show the process
        )
        self._queue_collector.snapshots = {
            name: None if isinstance(snap, BaseException) else snap
            for name, snap in zip(names, read, strict=True)
        }
        return generate_latest(self.registry)


class _QueueCollector:
    """Each queue's BullMQ job counts by state and limiter state, from the last snapshots."""

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self.snapshots: dict[str, QueueSnapshot | None] = {}

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "worker_redis_up", "1 when this scrape read the queue from Redis", labels=["queue"]
        )
        # BullMQ's exportPrometheusMetrics calls these bullmq_job_count, a name promtool
        # refuses (`_count` is a histogram's suffix): same figures, a name that passes.
        counts = GaugeMetricFamily(
            "worker_queue_jobs",
            "Jobs in the queue by BullMQ state, as queue.getJobCounts() counts them",
            labels=["queue", "state"],
        )
        paused = GaugeMetricFamily(
            "worker_queue_paused",
            "1 while the queue is paused (queue.pause(): no worker takes jobs)",
            labels=["queue"],
        )
        limited = GaugeMetricFamily(
            "worker_queue_rate_limited_seconds",
            "How long the queue-wide rate limit still holds every worker back (0: not limited)",
            labels=["queue"],
        )
        for queue in self.queues:
            snap = self.snapshots.get(queue)
            up.add_metric([queue], 0 if snap is None else 1)
            if snap is None:
                continue
            for state in QUEUE_STATES:
                counts.add_metric([queue, state], snap.counts.get(state, 0))
            paused.add_metric([queue], int(snap.paused))
            limited.add_metric([queue], snap.rate_limited_ms / 1000)
        yield up
        for family in (counts, paused, limited):
            if family.samples:  # no queue read: absent, as before, rather than empty
                yield family
