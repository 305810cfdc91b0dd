"""A Redis for the test session: the machine's when it answers, else a private one we start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

DEFAULT_URL = "redis://127.0.0.1:6379"


def answers(url: str, ca_file: Path | None = None) -> bool:
    tls = {"ssl_ca_certs": str(ca_file)} if ca_file else {}
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2, **tls) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError):
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A CA made for the test, and a server certificate it signed for localhost/127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A private CA and a server certificate, by the openssl CLI (EC keys: fast to make)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl not found: apt-get install openssl")
    d = directory
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ai-jobs test CA")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2",
        "-CAcreateserial", "-out", "server.pem", "-extfile", "server.ext")  # fmt: skip
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis(
    password: str | None = None, tls: TlsFiles | None = None, args: Sequence[str] = ()
) -> Iterator[str]:
    """Start `redis-server` on a free port in a temp dir; yield its URL; stop it after.
    `tls`: that port speaks TLS only (`rediss://`), with that certificate; `args`: more
    redis-server options."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    ports = ["--port", str(port)]
    if tls is not None:
        ports = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
                 "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                 "--tls-auth-clients", "no"]  # fmt: skip
    argv = [
        binary,
        *ports,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        workdir,
        "--daemonize",
        "no",
    ]
    if password:
        argv += ["--requirepass", password]
    argv += args
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = f":{password}@" if password else ""
    url = f"{'rediss' if tls else 'redis'}://{auth}127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while not answers(url, tls.ca if tls else None):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def session_redis() -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL", DEFAULT_URL)
    if answers(url):
        yield url
        return
    with private_redis() as private:
        yield private


@contextmanager
def private_cluster(masters: int = 3) -> Iterator[list[str]]:
    """A Redis Cluster of `masters` private `redis-server --cluster-enabled yes` (no replicas),
    formed by `redis-cli --cluster create`; yields the nodes' URLs once every slot is served."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli not found: apt-get install redis-tools")
    with ExitStack() as stack:
        urls = [stack.enter_context(cluster_node()) for _ in range(masters)]
        addresses = [url.removeprefix("redis://") for url in urls]
        subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)  # fmt: skip
        deadline = time.monotonic() + 20
        while not all(_cluster_ok(url) for url in urls):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield urls


def cluster_node() -> AbstractContextManager[str]:
    """One private `redis-server --cluster-enabled yes`, not yet part of any cluster."""
    # the bus port (default: port + 10000) may be past 65535: one of its own for each node
    return private_redis(args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "5000", "--cluster-port",
                               str(free_port())))  # fmt: skip


def _until(done: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test cluster: {what} did not happen within {timeout_s} s")
        time.sleep(0.05)


def add_replica(master: str, replica: str) -> None:
    """Join the node at `replica` to the cluster as a replica of `master`; returns once it
    has synced."""
    with redis.Redis.from_url(master, decode_responses=True) as m, \
            redis.Redis.from_url(replica, decode_responses=True) as r:  # fmt: skip
        master_id = str(m.execute_command("CLUSTER", "MYID"))
        host, port = master.removeprefix("redis://").split(":")
        bus_port = m.config_get("cluster-port")["cluster-port"]  # not port + 10000 here
        r.execute_command("CLUSTER", "MEET", host, port, bus_port)
        _until(lambda: master_id in str(r.execute_command("CLUSTER", "NODES")), "MEET")
        r.execute_command("CLUSTER", "REPLICATE", master_id)
        _until(lambda: r.info("replication").get("master_link_status") == "up", "replica sync")


def take_over(urls: Sequence[str], replica: str, slot: int) -> None:
    """CLUSTER FAILOVER TAKEOVER on `replica` (no vote of its master: as when it died), then
    wait until the nodes at `urls` agree that it serves `slot`."""
    master = slot_owner(urls, slot)
    with redis.Redis.from_url(replica, decode_responses=True) as r, \
            redis.Redis.from_url(master, decode_responses=True) as m:  # fmt: skip
        _until(lambda: r.info("replication").get("master_link_status") == "up", "replica sync")
        # Writes held for a moment while the replica catches up, as a graceful failover does:
        # replication is asynchronous, and a takeover would lose what it had not received.
        m.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        offset = m.info("replication")["master_repl_offset"]
        _until(lambda: r.info("replication")["slave_repl_offset"] >= offset, "catch-up")
        r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
    _until(lambda: all(slot_owner([url], slot) == replica for url in urls), "the takeover")


def forget(urls: Sequence[str], node_id: str) -> None:
    for url in urls:
        with redis.Redis.from_url(url) as r:
            r.execute_command("CLUSTER", "FORGET", node_id)


def _cluster_ok(url: str) -> bool:
    with redis.Redis.from_url(url, decode_responses=True) as r:
        info = r.execute_command("CLUSTER", "INFO")
        text = info if isinstance(info, str) else str(info)
        return "cluster_state:ok" in text and "cluster_known_nodes:" in text


def slot_owner(urls: Sequence[str], slot: int) -> str:
    """The URL of the master serving `slot`."""
    with redis.Redis.from_url(urls[0], decode_responses=True) as r:
        for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return f"redis://{primary[0]}:{primary[1]}"
    raise RuntimeError(f"no node serves slot {slot}")


def migrate_slot(urls: Sequence[str], slot: int, target: str, batch: int = 10) -> int:
    """Move `slot` to the master at `target` as `redis-cli --cluster reshard` does: IMPORTING on
    the target, MIGRATING on the source, MIGRATE its keys `batch` at a time (clients meanwhile
    meet ASK and TRYAGAIN), then SETSLOT NODE on every master. Returns the keys moved."""
    source = slot_owner(urls, slot)
    clients = {url: redis.Redis.from_url(url, decode_responses=True) for url in urls}
    try:
        ids = {url: str(c.execute_command("CLUSTER", "MYID")) for url, c in clients.items()}
        src, dst = clients[source], clients[target]
        host, port = target.removeprefix("redis://").split(":")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for url in [target, source, *(u for u in urls if u not in (source, target))]:
            clients[url].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        return moved
    finally:
        for c in clients.values():
            c.close()
