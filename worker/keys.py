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
