"""railway.toml + nixpacks.toml: the settings Railway needs; a build and start as the builder does.

The slow test copies the repository (tracked files plus untracked-but-not-ignored ones) into an
empty directory, runs nixpacks.toml's install commands there exactly as the generated Dockerfile
does (`RUN <cmd>` with `/bin/sh -c`, working directory = the app), then starts the service as the
image does (`ENTRYPOINT ["/bin/bash", "-l", "-c"]` + the start command) with a minimal
environment, waits for `/health`, runs one `ping` job through it, sends SIGTERM to that process
and checks it exits 0 within the grace period having printed its statistics.

Two image paths are mapped into the temp directory: `/app` (the image's WORKDIR) and the venv
directory of the install phase's `paths` (`/opt/venv`). Nothing else in the commands changes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RAILWAY = REPO / "railway.toml"
NIXPACKS = REPO / "nixpacks.toml"
IMAGE_APP_DIR = "/app"  # nixpacks' WORKDIR (dockerfile_generation.rs, APP_DIR)
START_CMD = "python -m worker"
DEFAULTS = Settings.from_env({})
SHELL_METACHARACTERS = set(";&|<>()$`\\\"'*?[]#~=%\n")


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="module")
def railway() -> dict[str, Any]:
    return load(RAILWAY)


@pytest.fixture(scope="module")
def nixpacks() -> dict[str, Any]:
    return load(NIXPACKS)


# --- the files -----------------------------------------------------------------------------


def test_railway_toml_is_one_service_in_railways_schema(railway: dict[str, Any]) -> None:
    # Per-service file: build/deploy (and environment overrides), no [[services]] list.
    assert set(railway) <= {"$schema", "build", "deploy", "environments"}, set(railway)
    assert railway["build"]["builder"] == "NIXPACKS"
    assert railway["build"]["nixpacksConfigPath"] == "nixpacks.toml"
    assert (REPO / railway["build"]["nixpacksConfigPath"]).is_file()
    for key in railway["deploy"]:
        assert key in {
            "startCommand", "healthcheckPath", "healthcheckTimeout", "restartPolicyType",
            "restartPolicyMaxRetries", "drainingSeconds", "overlapSeconds", "numReplicas",
            "preDeployCommand", "cronSchedule", "multiRegionConfig",
        }, f"not a Railway deploy setting: {key}"  # fmt: skip


def test_railway_deploy_settings(railway: dict[str, Any], nixpacks: dict[str, Any]) -> None:
    deploy = railway["deploy"]
    assert deploy["startCommand"] == START_CMD == nixpacks["start"]["cmd"]
    assert deploy["healthcheckPath"] == "/health"
    assert deploy["restartPolicyType"] == "ON_FAILURE"
    assert deploy["restartPolicyMaxRetries"] == 10
    # Railway's parser wants numbers, not strings (railwayapp/docs issue #1243).
    numbers = ("healthcheckTimeout", "restartPolicyMaxRetries", "drainingSeconds", "overlapSeconds")
    for key in numbers:
        value = deploy[key]
        assert isinstance(value, int) and not isinstance(value, bool), (key, value)
    assert deploy["healthcheckTimeout"] > 0


def test_draining_time_outlasts_the_shutdown_grace(railway: dict[str, Any]) -> None:
    draining = railway["deploy"]["drainingSeconds"]
    assert DEFAULTS.shutdown_grace_s == 25.0
    # Grace for in-flight jobs, then requeue (up to 5 s a job) and close: keep real headroom.
    assert draining >= DEFAULTS.shutdown_grace_s + 10, draining


def test_start_command_is_one_exec_able_command(nixpacks: dict[str, Any]) -> None:
    """bash -l -c execs a single simple command; anything more and bash stays PID 1."""
    cmd = nixpacks["start"]["cmd"]
    assert not (set(cmd) & SHELL_METACHARACTERS), cmd
    assert shlex.split(cmd) == ["python", "-m", "worker"]


def test_nixpacks_builds_python_311_from_the_lock_file(nixpacks: dict[str, Any]) -> None:
    assert nixpacks["providers"] == ["python"]
    assert nixpacks["variables"]["NIXPACKS_PYTHON_VERSION"] == "3.11"
    setup = nixpacks["phases"]["setup"]
    assert "python311" in setup["nixPkgs"]
    assert not any(p.startswith("python3") and p != "python311" for p in setup["nixPkgs"])
    install = nixpacks["phases"]["install"]
    assert install["dependsOn"] == ["setup"]
    # Overrides the provider's ["pyproject.toml"], which would leave the lock file out.
    assert install["onlyIncludeFiles"] == ["requirements.lock"]
    assert all((REPO / name).is_file() for name in install["onlyIncludeFiles"])
    joined = " && ".join(install["cmds"])
    assert "-m venv" in joined and "-r requirements.lock" in joined
    assert "pyproject" not in joined and "install ." not in joined
    venv_python = Path(install["paths"][0]).parent / "bin" / "python"
    assert any(cmd.startswith(f"{venv_python} -m pip install") for cmd in install["cmds"])
    pyproject = load(REPO / "pyproject.toml")
    assert pyproject["project"]["requires-python"] == ">=3.11,<3.13"


def test_health_port_follows_railways_port() -> None:
    assert Settings.from_env({}).health_port == 3002
    assert Settings.from_env({"PORT": "8123"}).health_port == 8123
    assert Settings.from_env({"PORT": "8123", "WORKER_HEALTH_PORT": "3002"}).health_port == 3002


# --- build and start the way the builder does ----------------------------------------------


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
    """A plain CPython 3.11 (the venv's base interpreter), standing in for nixpkgs' python311."""
    base = getattr(sys, "_base_executable", sys.executable)
    version = subprocess.run(
        [base, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    if version != "3.11":
        pytest.skip(f"needs a Python 3.11 interpreter to stand in for python311, found {version}")
    return base


def pip_cache_dir() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out or str(Path.home() / ".cache" / "pip")


def system_path() -> str:
    return os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())


class Image:
    """The parts of the nixpacks image the commands touch, rooted in a temp directory."""

    def __init__(self, root: Path, nixpacks: dict[str, Any]) -> None:
        install = nixpacks["phases"]["install"]
        self.root = root
        self.app = root / "app"
        self.home = root / "home"
        self.bin = root / "nix-bin"  # what the setup phase's nix packages put on PATH
        (venv_bin,) = install["paths"]
        self.venv_image = str(Path(venv_bin).parent)
        self.venv = root / "venv"
        self.variables = {k: str(v) for k, v in nixpacks.get("variables", {}).items()}
        for directory in (self.app, self.home, self.bin):
            directory.mkdir()

    def map(self, text: str) -> str:
        """Image paths to temp paths (longest first)."""
        return text.replace(self.venv_image, str(self.venv)).replace(IMAGE_APP_DIR, str(self.app))

    @property
    def path(self) -> str:
        # `ENV PATH <phase paths>:$PATH` after the setup phase's nix profile.
        return os.pathsep.join([str(self.venv / "bin"), str(self.bin), system_path()])


@pytest.fixture
def image(nixpacks: dict[str, Any]) -> Iterator[Image]:
    root = Path(tempfile.mkdtemp(prefix="deploy-image-"))
    try:
        yield Image(root, nixpacks)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def deploy_queue(redis_url: str) -> Iterator[str]:
    name = f"test-deploy-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"bull:{name}:*", count=500):
            client.delete(key)
    finally:
        client.close()


def copy_in(image: Image, names: list[str]) -> None:
    for name in names:
        target = image.app / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


def build(image: Image, nixpacks: dict[str, Any]) -> None:
    install = nixpacks["phases"]["install"]
    context = repo_files()  # the build context
    # The install phase sees only its onlyIncludeFiles (`COPY <file> /app/<file>`), else all.
    only = install.get("onlyIncludeFiles")
    copy_in(image, [name for name in context if only is None or name in only])
    os.symlink(python_311(), image.bin / "python")  # setup phase: nixPkgs python311
    env = {
        "PATH": image.path,
        "HOME": str(image.home),
        "PIP_CACHE_DIR": pip_cache_dir(),  # the image's cacheDirectories, shared with this host
        **image.variables,
    }
    for cmd in nixpacks["phases"]["install"]["cmds"]:  # `RUN <cmd>`: /bin/sh -c in WORKDIR
        done = subprocess.run(
            ["/bin/sh", "-c", image.map(cmd)], cwd=image.app, env=env,
            capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        assert done.returncode == 0, f"install step failed: {cmd}\n{done.stdout}\n{done.stderr}"
    copy_in(image, context)  # the start phase: `COPY . /app`
    assert not (image.app / ".venv").exists()
    # `paths` also go into /root/.profile, which `bash -l` reads after /etc/profile resets PATH.
    paths = nixpacks["phases"]["install"]["paths"]
    (image.home / ".profile").write_text("".join(f"\nPATH={image.map(p)}:$PATH" for p in paths))


def get_health(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def output_of(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_and_start_like_the_builder(
    image: Image,
    nixpacks: dict[str, Any],
    railway: dict[str, Any],
    redis_url: str,
    deploy_queue: str,
) -> None:
    build(image, nixpacks)
    assert (image.venv / "bin" / "python").exists()

    port = free_port()
    env = {
        "PATH": image.path,  # the image's ENV PATH (bash -l rebuilds it from the profiles)
        "HOME": str(image.home),
        "REDIS_URL": redis_url,
        "PORT": str(port),  # Railway injects PORT; WORKER_HEALTH_PORT is not set
        "WORKER_QUEUE": deploy_queue,
        # generate-flashcards refuses to start without an OpenAI key; this checks the deploy.
        "WORKER_JOB_TYPES": "ping",
        **image.variables,  # [variables] become ENV in the image
    }
    start_cmd = railway["deploy"]["startCommand"]
    log = image.root / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["/bin/bash", "-l", "-c", start_cmd],  # ENTRYPOINT + CMD of the nixpacks image
            cwd=image.app, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        health = None
        deadline = time.monotonic() + railway["deploy"]["healthcheckTimeout"]
        while time.monotonic() < deadline and proc.poll() is None:
            health = get_health(port)
            if health is not None:
                break
            time.sleep(0.2)
        assert health is not None, f"/health never answered:\n{output_of(log)}"
        status, body = health
        assert status == 200 and body["status"] == "healthy" and body["service"] == "worker", body

        # The process Railway signals is the one the start command started: Python, not bash.
        exe = Path(os.readlink(f"/proc/{proc.pid}/exe")).name
        assert exe.startswith("python"), f"PID {proc.pid} is {exe}, not Python: SIGTERM would miss"
        assert body["pid"] == proc.pid
        assert Path(os.readlink(f"/proc/{proc.pid}/cwd")) == image.app

        # One job end to end, added with the built venv's own CLI.
        enqueue = subprocess.run(
            [str(image.venv / "bin" / "python"), "-m", "worker", "enqueue", "ping",
             "--data", '{"echo": "deploy"}', "--wait", "--timeout", "30"],
            cwd=image.app, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert enqueue.returncode == 0, f"{enqueue.stdout}\n{enqueue.stderr}\n{output_of(log)}"
        result = json.loads(enqueue.stdout.strip().splitlines()[-1])
        assert result["status"] == "completed" and result["result"]["echo"] == "deploy", result

        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=DEFAULTS.shutdown_grace_s + 5)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output_of(log)
    assert code == 0, f"exit code {code}:\n{text}"
    assert took < DEFAULTS.shutdown_grace_s < railway["deploy"]["drainingSeconds"], took
    assert "Received SIGTERM" in text, text
    assert "WORKER STATISTICS" in text, text
    assert "Succeeded: 1" in text, text
    assert f"Health check server listening on port {port}" in text, text
