"""Redis over TLS (issue 17, item 1): a local `redis-server --tls-port` with a CA made here."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from loguru import logger

from tests.support.harness import running_service, settings_for, unique_queue
from tests.support.node_bridge import NodeBridge
from tests.support.proc import WorkerProcess
from tests.support.redis_server import TlsFiles, make_tls_files, private_redis
from worker.errors import ConfigError
from worker.loop import RedisUnavailable
from worker.protocol import QueueProtocol
from worker.redis_probe import RedisUnreachable, probe
from worker.settings import Settings


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    with tempfile.TemporaryDirectory(prefix="test-tls-") as directory:
        yield make_tls_files(Path(directory))


@pytest.fixture(scope="module")
def tls_url(tls_files: TlsFiles) -> Iterator[str]:
    """A redis-server that speaks TLS only (no plain port): every connection made is TLS."""
    with private_redis(tls=tls_files, args=("--bind", "127.0.0.1", "127.0.0.2")) as url:
        yield url


@pytest.fixture(scope="module")
async def tls_node(tls_url: str, tls_files: TlsFiles) -> AsyncIterator[NodeBridge]:
    """The web service's producer (ioredis) on the same `rediss://`, trusting the test CA."""
    bridge = await NodeBridge.start("6", tls_url, env={"NODE_EXTRA_CA_CERTS": str(tls_files.ca)})
    yield bridge
    await bridge.aclose()


def cli_env(url: str, queue: str, **more: str) -> dict[str, str]:
    return {"REDIS_URL": url, "WORKER_QUEUE": queue, "WORKER_JOB_TYPES": "ping", **more}


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await WorkerProcess.start(env, *args)
    return await proc.wait(timeout=60), proc.output


async def test_node_jobs_run_over_tls_with_a_private_ca(
    tls_url: str, tls_files: TlsFiles, tls_node: NodeBridge
) -> None:
    """Every connection of the service: the command pool, the completion lanes (8 slots finish
    together) and the blocking wait (the jobs arrive after it started waiting)."""
    queue = unique_queue("tls")
    settings = settings_for(
        tls_url, queue, REDIS_TLS_CA_FILE=tls_files.ca, WORKER_CONCURRENCY=8,
        WORKER_LIMITER_MAX=0,
    )  # fmt: skip
    async with running_service(settings) as service:
        assert service.worker is not None
        await asyncio.sleep(0.2)  # the slots are in their blocking wait now
        added = await tls_node.add_bulk(
            queue, [{"name": "ping", "data": {"echo": n}} for n in range(40)]
        )
        for n, job_id in enumerate(added["ids"]):
            job = await tls_node.wait_finished(queue, job_id)
            assert job["state"] == "completed", job
            assert job["returnvalue"]["echo"] == n
        assert service.worker.protocol.move_to_finished._idle  # the lanes were used
    await tls_node.obliterate(queue)


async def test_the_system_cas_alone_refuse_a_private_ca_naming_the_variable(
    tls_url: str,
) -> None:
    settings = settings_for(tls_url, unique_queue("tls-untrusted"), WORKER_STARTUP_TIMEOUT_S=2)
    with pytest.raises(RedisUnavailable) as caught:
        async with running_service(settings):
            pass
    message = str(caught.value)
    assert "TLS failed with 127.0.0.1" in message and "certificate verify failed" in message
    assert "set REDIS_TLS_CA_FILE to its PEM bundle" in message, message


async def test_check_connects_as_the_service_does(tls_url: str, tls_files: TlsFiles) -> None:
    queue = unique_queue("tls-check")
    code, out = await run_cli(cli_env(tls_url, queue), "check")
    assert code == 1 and "NOT fit to run" in out, out
    assert "[FAIL] redis unreachable: TLS failed" in out and "REDIS_TLS_CA_FILE" in out, out

    code, out = await run_cli(cli_env(tls_url, queue, REDIS_TLS_CA_FILE=str(tls_files.ca)), "check")
    assert code == 0 and "fit to run" in out, out
    said = f"[  ok] redis connection: TLS, server certificate checked against the system CAs and {tls_files.ca}"  # noqa: E501
    assert said in out, out

    code, out = await run_cli(cli_env(tls_url, queue, REDIS_TLS_INSECURE="true"), "check")
    assert code == 0, out
    assert "[warn] redis connection: TLS WITHOUT certificate verification" in out, out


async def test_insecure_tls_is_said_loudly_and_works(tls_url: str, tls_node: NodeBridge) -> None:
    queue = unique_queue("tls-insecure")
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{level} {message}")
    try:
        settings = settings_for(tls_url, queue, REDIS_TLS_INSECURE="true")
        async with running_service(settings):
            added = await tls_node.add(queue, "ping", {"echo": "x"})
            job = await tls_node.wait_finished(queue, added["id"])
    finally:
        logger.remove(sink)
    assert job["state"] == "completed", job
    assert any(line.startswith("WARNING Redis TLS certificate NOT verified") for line in lines)
    await tls_node.obliterate(queue)


async def test_a_certificate_for_another_address_is_refused(
    tls_url: str, tls_files: TlsFiles
) -> None:
    """Hostname checking is on: the test certificate names localhost and 127.0.0.1 only, and
    the server also listens on 127.0.0.2."""
    other = tls_url.replace("127.0.0.1", "127.0.0.2")
    settings = settings_for(other, "q", REDIS_TLS_CA_FILE=tls_files.ca)
    with pytest.raises(RedisUnreachable) as caught:
        await probe(settings.redis, 5)
    assert caught.value.kind == "tls"
    assert "the certificate is not for '127.0.0.2'" in str(caught.value), caught.value


# --- settings -------------------------------------------------------------------------------


def test_tls_settings_name_the_variable(tmp_path: Path, tls_files: TlsFiles) -> None:
    def error(**env: str) -> str:
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
        return str(caught.value)

    rediss = "rediss://h:6380"
    assert error(REDIS_URL=rediss, REDIS_TLS_CA_FILE=str(tmp_path / "none.pem")).startswith(
        "REDIS_TLS_CA_FILE: cannot read"
    )
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    assert "holds no PEM certificate" in error(
        REDIS_URL=rediss, REDIS_TLS_CA_FILE=str(tmp_path / "key.pem")
    )
    ca = str(tls_files.ca)
    assert "REDIS_URL is not TLS" in error(REDIS_URL="redis://h", REDIS_TLS_CA_FILE=ca)
    assert "choose one" in error(REDIS_URL=rediss, REDIS_TLS_CA_FILE=ca, REDIS_TLS_INSECURE="1")
    assert error(REDIS_URL="redis://h", REDIS_TLS_INSECURE="true").startswith(
        "REDIS_TLS_INSECURE: set, but REDIS_URL is not TLS"
    )
    host = {"REDIS_HOST": "h", "REDIS_TLS": "true", "REDIS_TLS_CA_FILE": ca}
    r = Settings.from_env(host).redis
    assert r.tls and r.tls_ca_file == ca and not r.tls_insecure


def test_every_connection_of_the_service_is_made_with_the_tls_class() -> None:
    from redis.asyncio.connection import SSLConnection

    settings = Settings.from_env({"REDIS_URL": "rediss://:secret@h:6380"})
    protocol = QueueProtocol(settings)
    pool = protocol.redis.connection_pool
    assert pool.connection_class is SSLConnection
    lane = pool.make_connection()  # what a completion lane gets (worker/autopipeline.py)
    assert isinstance(lane, SSLConnection)
    assert lane.ssl_context.cert_reqs == ssl.CERT_REQUIRED and lane.ssl_context.check_hostname
    assert protocol.blocking.connection_pool.connection_class is SSLConnection
    assert "secret" not in settings.redis.tls_mode + repr(settings.redis)
