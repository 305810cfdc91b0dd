"""Reaching Redis with the cause in words: bounded attempts, no hidden retries.

redis-py retries as bullmq configures it (20 times, backoff up to 20 s) and counts a wrong
password as a connection error, so a wrong password or a closed port turned into a silent hang,
or into a bare `TimeoutError` once a deadline cut it. Here one attempt takes at most `timeout_s`
and its failure is named: auth, refused, DNS, TLS, no answer. `check`, `enqueue`, `stats`,
start-up and `scripts/ensure-redis.sh` all go through it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from loguru import logger
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import ConfigError
from worker.settings import RedisSettings, Settings

# Kinds of failure that trying again cannot mend: start-up gives up on them at once.
LASTING = frozenset({"auth", "tls", "protocol", "refused-command"})
# Start-up: how long one attempt may take, and the pause between attempts.
ATTEMPT_S = 5.0
RETRY_S = 1.0

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
NAME_MISMATCH = frozenset({62, 64})

E = TypeVar("E", bound=BaseException)


class RedisUnreachable(Exception):
    """Redis cannot be used. `str()` is the cause in words (never a secret); `kind` is one of
    auth, tls, refused, dns, timeout, protocol, refused-command, other."""

    def __init__(self, cause: str, kind: str) -> None:
        super().__init__(cause)
        self.kind = kind

    @property
    def lasting(self) -> bool:
        return self.kind in LASTING


def bounded_client(redis: RedisSettings, timeout_s: float) -> Redis:
    """A client whose every connect and reply waits at most `timeout_s`, with no retries. Its
    connections are made as the service's command pool makes them (`pool_kwargs`: the same
    connection class, TLS context and CAs), so `check` cannot pass what the service fails."""
    pool = ConnectionPool(
        **{
            **redis.pool_kwargs(),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
        }
    )
    return Redis.from_pool(pool)


async def server_info(client: Redis, redis: RedisSettings, timeout_s: float) -> dict[str, Any]:
    """INFO from `client`, or RedisUnreachable saying why not, within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return dict(await client.info())
    except Exception as exc:
        raise RedisUnreachable(*describe(exc, redis, timeout_s)) from exc


async def probe(redis: RedisSettings, timeout_s: float) -> dict[str, Any]:
    """One attempt on a connection of its own: INFO, or RedisUnreachable with the cause."""
    client = bounded_client(redis, timeout_s)
    try:
        return await server_info(client, redis, timeout_s)
    finally:
        await client.aclose()


async def wait_until_reachable(redis: RedisSettings, timeout_s: float) -> dict[str, Any]:
    """Start-up: a lasting cause (auth, TLS) fails at once; a passing one (refused, DNS, no
    answer: Redis restarting, a network not up yet) is logged at once and tried again every
    second until `timeout_s`. Warns when the eviction policy can lose jobs."""
    deadline = time.monotonic() + timeout_s
    said = ""
    while True:
        left = deadline - time.monotonic()
        try:
            info = await probe(redis, max(min(left, ATTEMPT_S), 0.1))
            break
        except RedisUnreachable as exc:
            left = deadline - time.monotonic()
            if exc.lasting or left <= RETRY_S:
                raise
            if str(exc) != said:
                said = str(exc)
                logger.warning("Redis not reachable yet: {}; trying for {:.0f} s more", exc, left)
            await asyncio.sleep(RETRY_S)
    if problem := eviction_problem(info):
        logger.warning(problem)
    return info


def cluster_in_use(settings: Settings, info: dict[str, Any]) -> bool:
    """Whether to speak to a Redis Cluster, from the settings and the INFO of the node in the
    URL, as the service, `check`, `enqueue` and `stats` all decide it: REDIS_CLUSTER=true, or
    INFO `cluster_enabled:1`. ConfigError when REDIS_CLUSTER=true meets a node that is not
    one, or when a cluster meets a prefix without a hash tag."""
    found = str(info.get("cluster_enabled", "0")) == "1"
    redis = settings.redis
    if redis.cluster and not found:
        raise ConfigError(
            "REDIS_CLUSTER",
            f"true, but the server at {redis.host}:{redis.port} is not a cluster node "
            f"(INFO cluster_enabled:0): unset REDIS_CLUSTER",
        )
    if found and (error := settings.cluster_error("INFO cluster_enabled:1")):
        raise error
    return found


def eviction_problem(info: dict[str, Any]) -> str | None:
    """One line on a policy that lets Redis delete job keys, or None."""
    policy = info.get("maxmemory_policy")
    if policy in (None, "noeviction"):
        return None
    return (
        f"Redis maxmemory-policy is {policy}: when Redis fills up it deletes keys, and jobs "
        f"vanish or fail with their data missing; BullMQ needs noeviction. Fix: redis-cli "
        f"CONFIG SET maxmemory-policy noeviction (and maxmemory-policy noeviction in redis.conf, "
        f"or the provider's setting, to keep it after a restart)"
    )


def server_identity(info: dict[str, Any]) -> str:
    """The server and version as it reports itself: Valkey and Redict also report a
    `redis_version` (7.2.4, for clients that test it), which is not theirs."""
    name = str(info.get("server_name") or "")
    for key, label in (("valkey_version", "Valkey"), ("redict_version", "Redict")):
        if key in info:
            return f"{label} {info[key]}"
    if name and name.lower() != "redis" and f"{name}_version" in info:
        return f"{name.capitalize()} {info[f'{name}_version']}"
    return f"Redis {info.get('redis_version', '?')}"


def describe(exc: BaseException, redis: RedisSettings, timeout_s: float) -> tuple[str, str]:
    """(cause in words, kind) for a failure to use Redis. Names the setting, never its value."""
    where = f"{redis.host}:{redis.port}"
    source = "the default URL" if redis.source == "default" else redis.source
    chain = list(_chain(exc))
    if auth := _find(chain, AuthenticationError) or _auth_reply(chain):
        if redis.password is None:
            return f"Redis at {where} wants a password and {source} gives none", "auth"
        return (
            f"authentication failed at {where}: {auth} (check the user name and password in "
            f"{source})",
            "auth",
        )
    if verify := _find(chain, ssl.SSLCertVerificationError):
        hint = (
            f"the certificate is not for {redis.host!r}: connect by the name it was issued to"
            if verify.verify_code in NAME_MISMATCH
            else "a private CA? set REDIS_TLS_CA_FILE to its PEM bundle"
            if not redis.tls_ca_file
            else f"is {redis.tls_ca_file} (REDIS_TLS_CA_FILE) the CA that signed it?"
        )
        why = f"certificate verify failed: {verify.verify_message or verify}"
        return f"TLS failed with {where}: {why} ({hint})", "tls"
    if tls := _find(chain, ssl.SSLError):
        return f"TLS failed with {where}: {tls.reason or tls}", "tls"
    if _find(chain, ConnectionRefusedError):
        return (
            f"connection refused by {where}: nothing listens there (Redis down, or the wrong "
            f"host or port in {source})",
            "refused",
        )
    if dns := _find(chain, socket.gaierror):
        return f"host {redis.host!r} not found (DNS: {dns.strerror}); check {source}", "dns"
    if _find(chain, RedisTimeoutError) or _find(chain, TimeoutError):
        hint = (
            "TLS handshake unanswered: does this port speak TLS?"
            if redis.tls
            else "a firewall, the wrong host, or a TLS-only port (that needs rediss://)"
        )
        return f"no answer from {where} within {timeout_s:g} s ({hint})", "timeout"
    if bad := _find(chain, InvalidResponse):
        hint = "" if redis.tls else "; a TLS-only port needs rediss://"
        return f"{where} does not answer like Redis ({bad}{hint})", "protocol"
    if refused := _find(chain, ResponseError):
        return f"Redis at {where} refused: {refused}", "refused-command"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__, "other"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _find(chain: list[BaseException], kind: type[E]) -> E | None:
    return next((e for e in chain if isinstance(e, kind)), None)


def _auth_reply(chain: list[BaseException]) -> ResponseError | None:
    """NOAUTH / WRONGPASS replies that redis-py leaves as plain ResponseError."""
    for e in chain:
        if isinstance(e, ResponseError) and str(e).split(" ", 1)[0] in ("NOAUTH", "WRONGPASS"):
            return e
    return None
