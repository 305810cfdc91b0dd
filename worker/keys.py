"""Every Redis key name the worker writes outside BullMQ's own, in one place."""

from __future__ import annotations

# INTEROP §3: the web service reads this key before enqueueing; we write it on success.
IDEMPOTENCY_TTL_S = 86_400


def bull_key(prefix: str, queue: str, *parts: str) -> str:
    """A BullMQ key such as `bull:ai-jobs:wait` or `bull:ai-jobs:<job id>`."""
    return ":".join((prefix, queue, *parts))


def job_state_key(prefix: str, queue: str, job_id: str) -> str:
    """Per-job scratch state kept beside the job (resumable processors); removed with it by TTL."""
    return bull_key(prefix, queue, job_id, "py-state")


def worker_runs_key(prefix: str, queue: str, identity: str) -> str:
    """The runs (worker ids) seen under one stable worker identity: a set, for crash recovery."""
    return bull_key(prefix, queue, "py-runs", identity)


def worker_alive_key(prefix: str, queue: str, worker_id: str) -> str:
    """A run's heartbeat: present while the run is alive (short TTL, renewed every second)."""
    return bull_key(prefix, queue, "py-alive", worker_id)
