"""One module per job type; `build_registry` turns the environment into the worker's registry.

Each module exposes `JOB_NAME` and `build(env) -> ProcessorSpec`. `build` reads what the
processor needs from `env` (a plain mapping, never `os.environ` directly) and raises
`ConfigError` naming the variable when a credential is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from worker.registry import Registry

# Module names under processors/, in the order they are listed by `check`.
MODULES: tuple[str, ...] = ("ping", "generate_flashcards", "generate_lesson")


def build_registry(env: Mapping[str, str], only: Iterable[str] | None = None) -> Registry:
    """Build every processor (or only the job names in `only`) into one registry."""
    wanted = set(only) if only is not None else None
    registry = Registry()
    known: set[str] = set()
    for module_name in MODULES:
        module = importlib.import_module(f"processors.{module_name}")
        known.add(module.JOB_NAME)
        if wanted is not None and module.JOB_NAME not in wanted:
            continue
        registry.register(module.build(env))
    if wanted is not None and (unknown := wanted - known):
        raise ValueError(f"unknown job types: {', '.join(sorted(unknown))}")
    return registry
