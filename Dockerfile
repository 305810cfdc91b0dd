# The ai-jobs worker image: the build that works on Railway (a root Dockerfile always wins there:
# docs.railway.com/config-as-code/reference, "Railway will always build with a Dockerfile if it
# finds one"), Render, Fly, Coolify, Kubernetes. No engine may run on the machine this repository
# is developed on; tests/test_dockerfile.py replays this file instead (README, "Operator guide").
#
# Python 3.11 as pyproject.toml (requires-python >=3.11,<3.13), .python-version and
# nixpacks.toml say; Debian bookworm pinned too, so a base-image release cannot move glibc or
# the Python minor under us. For byte-for-byte rebuilds add the digest of the image you tested:
# FROM python:3.11-slim-bookworm@sha256:<digest>.
FROM python:3.11-slim-bookworm

# PYTHONUNBUFFERED: log lines reach Railway as they are written. PATH: the venv's python first,
# so CMD's `python` is the one with the dependencies.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# The lock file alone first, so the dependency layer is rebuilt only when it changes. Exact pins,
# runtime only (requirements-dev.lock stays out). A context without it stops the build here with
# `"/requirements.lock": not found`. --only-binary: every pinned package has a manylinux wheel
# for CPython 3.11 (hiredis, uvloop, aiohttp, pydantic-core ...) and the slim image has no
# compiler, so a lock change that would need one fails here, naming the package. --no-compile
# and no pip/setuptools in the venv: ~45 MB the worker never uses (bytecode comes below).
COPY requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir --no-input --only-binary=:all: \
        --no-compile -r requirements.lock \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools

# An unprivileged account with a fixed id (Kubernetes runAsNonRoot checks numbers, not names).
RUN groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin worker

# Only what runs: the service, the processors and the JSON Schemas (worker/contract.py loads
# them from <app>/contract at start-up). .dockerignore keeps caches and contract/node out.
COPY worker/ worker/
COPY processors/ processors/
COPY contract/ contract/

# Bytecode for exactly what `python -m worker` imports (~10 MB, not the ~30 MB of compiling every
# installed file), written while still root: the worker's user cannot write here, and without it
# every start would compile again (about 1 s more).
RUN PYTHONDONTWRITEBYTECODE= python -c "import importlib, processors, worker.cli, worker.service; \
    [importlib.import_module(f'processors.{name}') for name in processors.MODULES]"

USER 10001:10001

# The health server's default port (/health, /ready, /metrics); PORT or WORKER_HEALTH_PORT
# move it. Documentation only: Railway probes the port in PORT.
EXPOSE 3002

# Exec form: Python is PID 1 and receives SIGTERM itself (no shell in between), so the graceful
# drain runs on every redeploy.
CMD ["python", "-m", "worker"]
