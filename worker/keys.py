"""Every Redis key name the worker writes outside BullMQ's own, in one place."""

from __future__ import annotations

# INTEROP §3: the web service reads this key before enqueueing; we write it on success.
IDEMPOTENCY_TTL_S = 86_400


def bull_key(prefix: str, queue: str, *parts: str) -> str:
    """A BullMQ key such as `bull:ai-jobs:wait` or `bull:ai-jobs:<job id>`."""
    return ":".join((prefix, queue, *parts))


def hash_tag(prefix: str) -> str | None:
    """The Redis Cluster hash tag a prefix gives every key of its queues (`{bull}` -> `bull`),
    or None. Redis hashes only what lies between the first `{` and the next `}` when that is
    not empty; the tag must lie within the prefix, so that a queue's keys share one slot."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    if start < 0 or end <= start + 1:
        return None
    return prefix[start + 1 : end]


def job_state_key(prefix: str, queue: str, job_id: str) -> str:
    """Per-job scratch state kept beside the job (resumable processors); removed with it by TTL."""
    return bull_key(prefix, queue, job_id, "py-state")


def worker_runs_key(prefix: str, queue: str, identity: str) -> str:
    """The runs (worker ids) seen under one stable worker identity: a set, for crash recovery."""
    return bull_key(prefix, queue, "py-runs", identity)


def worker_alive_key(prefix: str, queue: str, worker_id: str) -> str:
    """A run's heartbeat: present while the run is alive (short TTL, renewed every second)."""
    return bull_key(prefix, queue, "py-alive", worker_id)


def refused_wait_key(prefix: str, queue: str, job_id: str) -> str:
    """Seconds a job has spent parked for upstream 429s, in total (WORKER_RATE_LIMIT_MAX_WAIT_S)."""
    return bull_key(prefix, queue, job_id, "py-refused-s")


# Provider protection (worker/providers.py). No BullMQ prefix: the web service reads the
# breaker's keys as the Node worker wrote them (INTEROP §8); `shared` is empty in production
# and a unique tag in tests, so test runs on one Redis never share a breaker.
#
# On a Redis Cluster a script's keys must share one slot. The keys only we read then put their
# scope in a hash tag, `{<scope>}:<field>`; the tag starts with the family's name, so it is never
# empty, and both keys of a script share every character up to the field, so whatever Redis
# takes as the tag (a `}` in a user id ends it early) is the same for both. On one plain Redis
# the names stay as they always were: a renamed key would split the limiter and hide the
# budget's holds between old and new replicas for the length of a rolling deploy.


def circuit_key(shared: str, provider: str, field: str) -> str:
    """`circuit:<provider>:<field>`: state, failures, successes, opened_at (the web reads them),
    probe (ours: the lease of the one call HALF_OPEN lets through)."""
    return f"{shared}circuit:{provider}:{field}"


def beside(key: str, field: str) -> str:
    """A key in the cluster slot of `key`: `{<key>}:<field>` for a name without a hash tag (its
    slot is that of its whole text), `<key>:<field>` for one with a tag (a tagged
    PROTECTION_KEY_PREFIX: the tag decides the slot of both). On a cluster the breaker keeps
    its counters beside the state key the web service reads, so one script decides on both."""
    return f"{key}:{field}" if hash_tag(key) is not None else f"{{{key}}}:{field}"


def rate_key(shared: str, provider: str, model: str, field: str, cluster: bool = False) -> str:
    """`ratelimit:<provider>:<model>:<field>` (on a cluster `{ratelimit:<provider>:<model>}:
    <field>`): requests / tokens (GCRA theoretical arrival times, ms) and cooldown (ms epoch
    until which the provider's 429 holds every call back)."""
    return _scoped(f"{shared}ratelimit:{provider}:{model}", field, cluster)


def budget_key(shared: str, user_id: str, month: str, field: str, cluster: bool = False) -> str:
    """`budget:<user>:<YYYY-MM>:<field>` (on a cluster `{budget:<user>:<YYYY-MM>}:<field>`):
    reserved (a sorted set of leases) and settled (micro-USD settled since, for reads of
    Supabase that raced a settlement)."""
    return _scoped(f"{shared}budget:{user_id}:{month}", field, cluster)


def _scoped(scope: str, field: str, cluster: bool) -> str:
    return beside(scope, field) if cluster else f"{scope}:{field}"
