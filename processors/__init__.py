"""One module per job type; `build_registry` turns the environment into the worker's registry.

Each module exposes `JOB_NAME` and `build(env) -> ProcessorSpec`. `build` reads what the
processor needs from `env` (a plain mapping, never `os.environ` directly) and raises
`ConfigError` naming the variable when a credential is missing. A job type whose provider is
optional raises `ProviderMissing` instead: it is registered as disabled, and start-up goes on.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from worker.errors import ConfigError, ConfigProblems, ProviderMissing
from worker.registry import ProcessorSpec, Registry

# Module names under processors/, in the order they are listed by `check`.
MODULES: tuple[str, ...] = (
    "ping",
    "generate_flashcards",
    "generate_lesson",
    "process_image",
    "assess_pronunciation",  # queue audio-jobs
    "generate_audio_lesson",  # queue audio-jobs
    "create_simple_audio",  # queue audio-jobs
)


def build_each(
    env: Mapping[str, str], only: Iterable[str] | None = None
) -> list[tuple[str, ProcessorSpec | ConfigError]]:
    """(job name, its processor or what stops it being built), for every wanted job type."""
    wanted = set(only) if only is not None else None
    built: list[tuple[str, ProcessorSpec | ConfigError]] = []
    known: set[str] = set()
    for module_name in MODULES:
        module = importlib.import_module(f"processors.{module_name}")
        known.add(module.JOB_NAME)
        if wanted is not None and module.JOB_NAME not in wanted:
            continue
        try:
            built.append((module.JOB_NAME, module.build(env)))
        except ConfigError as exc:
            built.append((module.JOB_NAME, exc))
    if wanted is not None and (unknown := wanted - known):
        raise ValueError(f"unknown job types: {', '.join(sorted(unknown))}")
    return built


def build_registry(env: Mapping[str, str], only: Iterable[str] | None = None) -> Registry:
    """Build every processor (or only the job names in `only`) into one registry; ConfigError
    lists every problem of every processor at once."""
    registry = Registry()
    problems = ConfigProblems()
    for name, spec in build_each(env, only):
        if isinstance(spec, ProviderMissing):
            registry.disable(name, spec.sentence)
        elif isinstance(spec, ConfigError):
            problems.errors.extend(e for e in spec.each if str(e) not in map(str, problems.errors))
        else:
            registry.register(spec)
    problems.raise_any()
    return registry
