"""Replaying a deploy build without a container engine: image paths mapped into a temp dir.

Shared by tests/test_deploy.py (nixpacks.toml) and tests/test_dockerfile.py (Dockerfile). Both
run the build's install commands as written, with the image's absolute paths (the app directory,
the venv, the base image's python) mapped onto temp directories, then start the service with the
image's start command and check it the same way (`start_and_check`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def repo_files() -> list[str]:
    """Tracked files plus untracked ones that are not ignored: what a deploy would upload."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_311() -> str:
    """A plain CPython 3.11 (the venv's base interpreter), standing in for the image's python."""
    base = getattr(sys, "_base_executable", sys.executable)
    version = subprocess.run(
        [base, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if version != "3.11":
        pytest.skip(f"needs a Python 3.11 interpreter to stand in for the image's, found {version}")
    return base


def system_path() -> str:
    return os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())


@dataclass
class PathMap:
    """Image paths -> temp paths, whole paths only (/app, not /application or /x/app); longer
    image paths first (/opt/venv/bin before /opt/venv)."""

    paths: dict[str, Path] = field(default_factory=dict)

    def add(self, image_path: str, host: Path) -> Path:
        self.paths[image_path] = host
        return host

    def map(self, text: str) -> str:
        for image_path in sorted(self.paths, key=len, reverse=True):
            pattern = rf"(?<![\w./-]){re.escape(image_path)}(?![\w.-])"
            host = str(self.paths[image_path])
            text = re.sub(pattern, lambda _, host=host: host, text)
        return text


def run_build_step(cmd: str, cwd: Path, env: Mapping[str, str], timeout_s: float = 480) -> None:
    """`RUN <cmd>` as an image builder runs it: `/bin/sh -c` in the working directory."""
    done = subprocess.run(
        ["/bin/sh", "-c", cmd], cwd=cwd, env=dict(env), capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip
    assert done.returncode == 0, f"build step failed: {cmd}\n{done.stdout}\n{done.stderr}"


def get_health(port: int, host: str = "127.0.0.1") -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def output_of(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


@dataclass
class Started:
    """What `start_and_check` saw, for a caller's own assertions."""

    output: str
    exit_code: int
    sigterm_to_exit_s: float


def start_and_check(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    cli_python: Path,
    port: int,
    health_timeout_s: float,
    shutdown_grace_s: float,
    log: Path,
) -> Started:
    """Start the image's command; /health answers; PID is Python; one ping job; SIGTERM -> 0.

    `env` must carry REDIS_URL, PORT (= `port`), WORKER_QUEUE and WORKER_JOB_TYPES=ping (the AI
    job types refuse to start without an OpenAI key; this checks the deploy, not them).
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )  # fmt: skip
    try:
        health = None
        deadline = time.monotonic() + health_timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            health = get_health(port)
            if health is not None:
                break
            time.sleep(0.2)
        assert health is not None, f"/health never answered:\n{output_of(log)}"
        status, body = health
        assert status == 200 and body["status"] == "healthy" and body["service"] == "worker", body

        # The process the platform signals is the one the start command started: Python.
        exe = Path(os.readlink(f"/proc/{proc.pid}/exe")).name
        assert exe.startswith("python"), f"PID {proc.pid} is {exe}, not Python: SIGTERM would miss"
        assert body["pid"] == proc.pid
        assert Path(os.readlink(f"/proc/{proc.pid}/cwd")) == cwd

        # One job end to end, added with the built venv's own CLI.
        enqueue = subprocess.run(
            [str(cli_python), "-m", "worker", "enqueue", "ping",
             "--data", '{"echo": "deploy"}', "--wait", "--timeout", "30"],
            cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert enqueue.returncode == 0, f"{enqueue.stdout}\n{enqueue.stderr}\n{output_of(log)}"
        result = json.loads(enqueue.stdout.strip().splitlines()[-1])
        assert result["status"] == "completed" and result["result"]["echo"] == "deploy", result

        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=shutdown_grace_s + 5)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output_of(log)
    assert code == 0, f"exit code {code}:\n{text}"
    assert took < shutdown_grace_s, took
    assert "Received SIGTERM" in text, text
    assert "WORKER STATISTICS" in text, text
    assert "Succeeded: 1" in text, text
    assert f"Health check server listening on port {port}" in text, text
    return Started(output=text, exit_code=code, sigterm_to_exit_s=took)
