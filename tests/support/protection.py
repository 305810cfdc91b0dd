"""Helpers for tests of provider protection (worker/providers.py), on one Redis or a cluster."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from worker.errors import Deferred

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.providers import Permit, Provider


async def race_for_the_probe(provider: Provider, one: Any, other: Any, n: int = 20) -> Permit:
    """`n` admissions at once through two clients (two replicas) of a breaker whose open time
    is over: exactly one goes through, as the probe; every other is parked for it. Returns it."""
    clients: tuple[Redis, Redis] = (one, other)
    tries = [provider.admit(clients[i % 2]) for i in range(n)]
    results = await asyncio.gather(*tries, return_exceptions=True)
    probes = [r for r in results if not isinstance(r, BaseException)]
    assert len(probes) == 1 and probes[0].probe, results
    assert all(isinstance(r, Deferred) and "probe call in flight" in str(r)
               for r in results if r is not probes[0]), results  # fmt: skip
    return probes[0]
