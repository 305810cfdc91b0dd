"""Reading a Dockerfile and its .dockerignore the way a builder does, for the replay test.

Only what this repository's Dockerfile uses is understood (FROM, ENV, WORKDIR, COPY, RUN, USER,
EXPOSE, CMD); anything else is an error, so a Dockerfile that grows past the replay fails its
test instead of being half-checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

KNOWN = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "CMD"}
# The ENV of the python:3.11-slim images before ours (docker-library/python, Dockerfile template).
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def instructions(text: str) -> list[Instruction]:
    """Comments dropped, `\\` continuations joined, keywords upper-cased."""
    found: list[Instruction] = []
    pending, first_line = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # a comment inside a continuation is skipped too, as Docker does
        if not pending:
            first_line = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip(), first_line))
        pending = ""
    if pending:
        raise ValueError(f"line {first_line}: continuation runs off the end of the file")
    unknown = [i for i in found if i.keyword not in KNOWN]
    if unknown:
        raise ValueError(f"instructions the replay does not know: {unknown}")
    return found


def expand(value: str, env: Mapping[str, str]) -> str:
    """`$VAR` and `${VAR}` from the ENV so far, as Docker substitutes them in ENV values."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def env_pairs(args: str, env: Mapping[str, str]) -> dict[str, str]:
    """`ENV a=1 b="x y"`: every pair sees the ENV before this instruction (Docker's rule)."""
    pairs: dict[str, str] = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV {args!r}: use key=value (the legacy `ENV key value` form)")
        pairs[key] = expand(value, env)
    return pairs


def exec_form(args: str) -> list[str] | None:
    """The JSON array of `CMD [...]`, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def copy_args(args: str) -> tuple[list[str], str]:
    words = shlex.split(args)
    if any(w.startswith("--") for w in words):
        raise ValueError(f"COPY {args!r}: flags are not replayed")
    if len(words) < 2:
        raise ValueError(f"COPY {args!r}: needs a source and a destination")
    return words[:-1], words[-1]


class DockerIgnore:
    """`.dockerignore` patterns: rooted at the context, `**` for any depth, `!` re-includes, the
    last matching line wins; a pattern matching a directory excludes everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.rules.append((negate, pattern))

    def excludes(self, path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for negate, pattern in self.rules:
            if any(_match(pattern, prefix) for prefix in prefixes):
                excluded = not negate
        return excluded


def _match(pattern: str, path: str) -> bool:
    """Go's filepath.Match plus Docker's `**`: `*` and `?` stop at `/`, `**` crosses it."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        elif pattern[i] == "[" and (end := pattern.find("]", i)) > i:
            regex, i = regex + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, path) is not None


def context_files(root: Path, ignore: DockerIgnore) -> Iterator[str]:
    """Every file `docker build root` would send, relative to root."""
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if not ignore.excludes(rel + d)]
        for name in files:
            if not ignore.excludes(rel + name):
                yield rel + name
