"""A Redis for the test session: the machine's when it answers, else a private one we start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
