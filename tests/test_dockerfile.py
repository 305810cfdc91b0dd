"""The root Dockerfile, replayed: no container engine may run here, so its steps run on the host.

The replay reads the Dockerfile the way a builder does (tests/support/dockerfile.py), sends the
context .dockerignore leaves, performs COPY into a temp `/app`, runs the install RUN steps with
/bin/sh -c (the venv path and the app directory mapped into temp directories, the base image's
`python` played by this machine's CPython 3.11), then starts CMD's argv exactly, without a shell,
with only the Dockerfile's ENV plus what a platform injects; checks /health, one `ping` job,
SIGTERM -> exit 0. Account-creating RUN steps (groupadd/useradd) are checked, not run; any other
RUN step fails the test until the replay is taught it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.dockerfile import (
    BASE_IMAGE_ENV,
    DockerIgnore,
    Instruction,
    context_files,
    copy_args,
    env_pairs,
    exec_form,
    instructions,
)
from tests.support.replay import (
    REPO,
    PathMap,
    free_port,
    python_311,
    run_build_step,
    start_and_check,
    system_path,
)
from worker.settings import Settings

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BASE_TAG = re.compile(r"python:3\.11(\.\d+)?-slim(-bookworm|-trixie)?(@sha256:[0-9a-f]{64})?")
INSTALL_STEP = re.compile(r"(\w+=\S* )*(python -m venv|/opt/venv/bin/python -m pip|python -c) ")
ACCOUNT_STEP = re.compile(r"(groupadd|useradd) ")


@pytest.fixture(scope="module")
def steps() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def only(steps: list[Instruction], keyword: str) -> list[Instruction]:
    return [step for step in steps if step.keyword == keyword]


def parts(run: Instruction) -> list[str]:
    return [part.strip() for part in run.args.split("&&")]


# --- the file -------------------------------------------------------------------------------


def test_base_is_python_311_slim_as_pyproject_and_the_other_builders_say(
    steps: list[Instruction],
) -> None:
    (base,) = only(steps, "FROM")  # one stage
    assert steps[0] == base and BASE_TAG.fullmatch(base.args), base
    with (REPO / "pyproject.toml").open("rb") as fh:
        assert tomllib.load(fh)["project"]["requires-python"] == ">=3.11,<3.13"
    assert (REPO / ".python-version").read_text().strip() == "3.11"
    with (REPO / "nixpacks.toml").open("rb") as fh:
        assert tomllib.load(fh)["variables"]["NIXPACKS_PYTHON_VERSION"] == "3.11"


def test_cmd_is_exec_form_python_and_the_user_is_not_root(steps: list[Instruction]) -> None:
    (cmd,) = only(steps, "CMD")
    assert exec_form(cmd.args) == ["python", "-m", "worker"], "exec form: Python is PID 1"
    assert not only(steps, "ENTRYPOINT")
    (user,) = only(steps, "USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user  # numeric: runAsNonRoot can check it
    created = " ".join(p for run in only(steps, "RUN") for p in parts(run) if "useradd" in p)
    assert f"--uid {uid}" in created, f"USER {uid} is not the account the Dockerfile creates"
    assert steps.index(user) > max(steps.index(s) for s in only(steps, "RUN")), "RUN as root"


def test_env_is_unbuffered_and_puts_the_venv_first(steps: list[Instruction]) -> None:
    env: dict[str, str] = dict(BASE_IMAGE_ENV)
    for step in only(steps, "ENV"):
        env.update(env_pairs(step.args, env))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == f"{env['VIRTUAL_ENV']}/bin"


def test_dependencies_come_from_the_lock_file_only(steps: list[Instruction]) -> None:
    installs = [p for run in only(steps, "RUN") for p in parts(run) if " pip install " in p]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0])
    assert words[words.index("-r") + 1] == "requirements.lock"
    assert "--no-cache-dir" in words and "-e" not in words and "." not in words
    assert not any("requirements-dev.lock" in step.args for step in steps)


def runtime_top_levels() -> set[str]:
    """Top-level directories of this repo that `python -m worker` imports or reads at run time."""
    probe = (
        "import importlib, sys, processors, worker.cli, worker.service, worker.contract\n"
        "for name in processors.MODULES: importlib.import_module(f'processors.{name}')\n"
        "files = [getattr(m, '__file__', None) or '' for m in list(sys.modules.values())]\n"
        "print('\\n'.join(files + [str(worker.contract.DEFAULT_ROOT)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    tops = set()
    for line in out.splitlines():
        path = Path(line)
        if path.is_absolute() and path.is_relative_to(REPO) and ".venv" not in path.parts:
            tops.add(path.relative_to(REPO).parts[0])
    return tops


def test_copy_brings_exactly_what_runs(steps: list[Instruction]) -> None:
    """A new top-level package the worker imports, and not copied, fails here, not in deploy."""
    copied = {src.rstrip("/") for step in only(steps, "COPY") for src in copy_args(step.args)[0]}
    needed = runtime_top_levels()
    assert needed == {"worker", "processors", "contract"}, needed
    assert copied == needed | {"requirements.lock"}, copied


def test_dockerignore_keeps_the_context_small_and_the_copies_in() -> None:
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for path in (".venv/bin/python", "node_modules/x", "tests/node/node_modules/bullmq/x.js",
                 "tests/test_units.py", "bench/run.py", ".git/HEAD", "worker/__pycache__/a.pyc",
                 "contract/node/index.js"):  # fmt: skip
        assert ignore.excludes(path), path
    for path in ("requirements.lock", "worker/__main__.py", "processors/ping.py",
                 "contract/ping/payload.schema.json"):  # fmt: skip
        assert not ignore.excludes(path), path


# --- build and start without an engine -----------------------------------------------------


@dataclass
class Replay:
    """The image's filesystem as far as the Dockerfile touches it, in a temp directory."""

    root: Path
    context: Path
    paths: PathMap = field(default_factory=PathMap)
    env: dict[str, str] = field(default_factory=lambda: dict(BASE_IMAGE_ENV))
    workdir: str = "/"
    cmd: list[str] = field(default_factory=list)
    user: str = "0"

    def __post_init__(self) -> None:
        base_bin = self.paths.add("/usr/local/bin", self.root / "base-bin")  # python's home
        base_bin.mkdir()
        for name in ("python", "python3"):
            (base_bin / name).symlink_to(python_311())

    def host_env(self) -> dict[str, str]:
        mapped = {key: self.paths.map(value) for key, value in self.env.items()}
        mapped["PATH"] = mapped["PATH"] + os.pathsep + system_path()
        return mapped

    def cwd(self) -> Path:
        return Path(self.paths.map(self.workdir))

    def apply(self, step: Instruction) -> None:
        if step.keyword == "ENV":
            self.env.update(env_pairs(step.args, self.env))
            if venv := self.env.get("VIRTUAL_ENV"):
                self.paths.add(venv, self.root / "venv")
        elif step.keyword == "WORKDIR":
            self.workdir = step.args
            self.cwd().mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            self.copy(*copy_args(step.args))
        elif step.keyword == "RUN":
            self.run(step)
        elif step.keyword == "USER":
            self.user = step.args
        elif step.keyword == "CMD":
            self.cmd = exec_form(step.args) or []

    def copy(self, sources: list[str], dest: str) -> None:
        target = self.cwd() / dest
        for src in sources:
            origin = self.context / src
            if not origin.exists():  # BuildKit's words
                raise FileNotFoundError(f'COPY {src}: "/{src.rstrip("/")}": not found')
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)

    def run(self, step: Instruction) -> None:
        if all(ACCOUNT_STEP.match(p) for p in parts(step)):
            return  # /etc/passwd of the image: checked by the USER test, not run on this host
        unknown = [p for p in parts(step) if not INSTALL_STEP.match(p + " ")]
        assert not unknown, f"line {step.line}: the replay does not know {unknown}; teach it"
        run_build_step(self.paths.map(step.args), self.cwd(), self.host_env())


def make_context(root: Path) -> Path:
    """What `docker build .` sends: the checkout minus .dockerignore (on disk, not git)."""
    context = root / "context"
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for name in context_files(REPO, ignore):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    return context


@pytest.fixture
def replay_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dockerfile-replay-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_context_without_the_lock_file_fails_naming_it(
    steps: list[Instruction], replay_root: Path
) -> None:
    context = make_context(replay_root)
    (context / "requirements.lock").unlink()
    replay = Replay(replay_root, context)
    with pytest.raises(FileNotFoundError, match=r'"/requirements\.lock": not found'):
        for step in steps:
            if step.keyword != "RUN":  # stop at the COPY, before any install
                replay.apply(step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_build_and_start_like_an_engine(
    steps: list[Instruction], replay_root: Path, redis_url: str, queue_name: str
) -> None:
    context = make_context(replay_root)
    assert not (context / "tests").exists() and not (context / ".venv").exists()
    replay = Replay(replay_root, context)
    for step in steps:
        replay.apply(step)
    venv = replay.root / "venv"
    app = replay.cwd()
    assert sorted(p.name for p in app.iterdir()) == [
        "contract", "processors", "requirements.lock", "worker",
    ]  # fmt: skip
    assert not (venv / "bin" / "pip").exists(), "pip stays out of the image's venv"
    assert list((venv / "lib").glob("python3.11/site-packages/openai/__pycache__/*.pyc"))

    port = free_port()
    env = {
        **replay.host_env(),  # the image's ENV, mapped
        "HOME": str(replay.root),  # what the engine sets for a user without a home
        "REDIS_URL": redis_url,
        "PORT": str(port),  # what Railway sets
        "WORKER_QUEUE": queue_name,
        "WORKER_JOB_TYPES": "ping",
    }
    started = start_and_check(
        replay.cmd,  # exec form, no shell: argv[0] found on the image's PATH
        cwd=app,
        env=env,
        cli_python=venv / "bin" / "python",
        port=port,
        health_timeout_s=60,
        shutdown_grace_s=Settings.from_env({}).shutdown_grace_s,
        log=replay.root / "worker.log",
    )
    assert "Traceback" not in started.output
