"""railway.toml + nixpacks.toml: the settings they carry; a Nixpacks build and start, replayed.

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

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.replay import (
    REPO,
    PathMap,
    free_port,
    python_311,
    repo_files,
    run_build_step,
    start_and_check,
    system_path,
)
from worker.settings import Settings

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
    # Numbers, not strings: the CLI and the IaC SDK type these as numbers.
    numbers = ("healthcheckTimeout", "restartPolicyMaxRetries", "drainingSeconds", "overlapSeconds")
    for key in numbers:
        value = deploy[key]
        assert isinstance(value, int) and not isinstance(value, bool), (key, value)
    assert deploy["healthcheckTimeout"] > 0


def test_every_build_starts_the_same_command_on_the_same_python(
    railway: dict[str, Any], nixpacks: dict[str, Any]
) -> None:
    """railway.toml, nixpacks.toml and the Dockerfile (which wins on Railway) agree."""
    from tests.support.dockerfile import exec_form, instructions

    (cmd,) = [i for i in instructions((REPO / "Dockerfile").read_text()) if i.keyword == "CMD"]
    assert exec_form(cmd.args) == shlex.split(railway["deploy"]["startCommand"])
    assert exec_form(cmd.args) == shlex.split(nixpacks["start"]["cmd"])
    python_version = (REPO / ".python-version").read_text().strip()
    assert python_version == nixpacks["variables"]["NIXPACKS_PYTHON_VERSION"] == "3.11"


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


def pip_cache_dir() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return out or str(Path.home() / ".cache" / "pip")


class Image:
    """The parts of the nixpacks image the commands touch, rooted in a temp directory."""

    def __init__(self, root: Path, nixpacks: dict[str, Any]) -> None:
        install = nixpacks["phases"]["install"]
        self.root = root
        self.app = root / "app"
        self.home = root / "home"
        self.bin = root / "nix-bin"  # what the setup phase's nix packages put on PATH
        (venv_bin,) = install["paths"]
        self.venv = root / "venv"
        self.paths = PathMap()
        self.paths.add(str(Path(venv_bin).parent), self.venv)
        self.paths.add(IMAGE_APP_DIR, self.app)
        self.map = self.paths.map
        self.variables = {k: str(v) for k, v in nixpacks.get("variables", {}).items()}
        for directory in (self.app, self.home, self.bin):
            directory.mkdir()

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
        run_build_step(image.map(cmd), image.app, env)
    copy_in(image, context)  # the start phase: `COPY . /app`
    assert not (image.app / ".venv").exists()
    # `paths` also go into /root/.profile, which `bash -l` reads after /etc/profile resets PATH.
    paths = nixpacks["phases"]["install"]["paths"]
    (image.home / ".profile").write_text("".join(f"\nPATH={image.map(p)}:$PATH" for p in paths))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_and_start_like_the_builder(
    image: Image,
    nixpacks: dict[str, Any],
    railway: dict[str, Any],
    redis_url: str,
    queue_name: str,
) -> None:
    build(image, nixpacks)
    assert (image.venv / "bin" / "python").exists()

    port = free_port()
    env = {
        "PATH": image.path,  # the image's ENV PATH (bash -l rebuilds it from the profiles)
        "HOME": str(image.home),
        "REDIS_URL": redis_url,
        "PORT": str(port),  # Railway injects PORT; WORKER_HEALTH_PORT is not set
        "WORKER_QUEUE": queue_name,
        # generate-flashcards refuses to start without an OpenAI key; this checks the deploy.
        "WORKER_JOB_TYPES": "ping",
        **image.variables,  # [variables] become ENV in the image
    }
    start_cmd = railway["deploy"]["startCommand"]
    started = start_and_check(
        ["/bin/bash", "-l", "-c", start_cmd],  # ENTRYPOINT + CMD of the nixpacks image
        cwd=image.app,
        env=env,
        cli_python=image.venv / "bin" / "python",
        port=port,
        health_timeout_s=railway["deploy"]["healthcheckTimeout"],
        shutdown_grace_s=DEFAULTS.shutdown_grace_s,
        log=image.root / "worker.log",
    )
    assert started.sigterm_to_exit_s < railway["deploy"]["drainingSeconds"]
