"""Tokens per job for the prompts of another ref (default `main`) against this tree (issue 18).

    make prompt-tokens        # or: .venv/bin/python bench/prompt_tokens.py [--ref REF]

What is counted: each tree's real processors (`generate-flashcards`, `generate-lesson`) run
the five sample inputs of bench/prompt_samples/ against the tests' OpenAI and PostgREST
stand-ins and a Redis (127.0.0.1:6379 or REDIS_URL), so the requests are exactly the ones
that tree sends. The other ref is taken with `git archive` into a temporary folder and run
from there. Counts use gpt-4o-mini's encoding, o200k_base, from the PyPI package `bpe-openai`
(its Rust crate ships the ranks; tiktoken would download them at run time, which cannot be
done here). `make prompt-tokens` installs it into the venv from bench/requirements-tokens.txt;
it is a bench tool, not in requirements.lock.

- input: per message 3 + 1 (role) + the content's tokens, plus 3 to prime the reply: the
  accounting of OpenAI's cookbook for gpt-4o chat messages.
- schema: the tokens of the strict JSON schema's compact text. OpenAI bills the schema as
  input but does not say how it renders it, so this column is an approximation; it is the
  same on both sides and shown apart.
- output: the tokens of the reply. The replies are made up here from the request and the
  sample (terms are words of the sample text, sentences are its sentences), the same reply
  for the same request on both sides; they stand in for what the model writes, so the
  output figures are estimates of the right size, not measurements. The comparison does
  not depend on them: a prompt change that adds N input tokens per call adds the same N to
  any output estimate.
- typical: every conversation uses its terms the first time (no second ask).
  worst: every conversation of this tree uses under half of them and is asked once more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = Path(__file__).resolve().parent / "prompt_samples"
USER_ID = "5f0c1e9a-3b7d-4c2e-9a61-0d8b2f4e7c13"
# gpt-4o-mini list prices, $ per 1M tokens (the budget's $0.60/$2.40 keep the same 1:4 ratio).
PRICE_IN, PRICE_OUT = 0.15, 0.60
SAMPLES: dict[str, dict[str, str]] = {
    "short": {
        "file": "short.txt",
        "subject": "Biology",
        "topic": "Photosynthesis",
        "nativeLanguage": "Spanish",
        "targetLanguage": "English",
    },
    "medium": {
        "file": "medium.txt",
        "subject": "Economics",
        "topic": "AI Selection",
        "nativeLanguage": "German",
        "targetLanguage": "English",
    },
    "long": {
        "file": "long.txt",
        "subject": "Law",
        "topic": "AI Selection",
        "nativeLanguage": "Portuguese",
        "targetLanguage": "English",
    },
    "spanish": {
        "file": "spanish.txt",
        "subject": "Biología",
        "topic": "La célula",
        "nativeLanguage": "English",
        "targetLanguage": "Spanish",
    },
    "medical": {
        "file": "medical.txt",
        "subject": "Medicine",
        "topic": "Hypertension",
        "nativeLanguage": "Spanish",
        "targetLanguage": "English",
    },
}
JOBS = ("generate-flashcards", "generate-lesson")
STOP = frozenset(
    "about after again against because before being between could every other their there "
    "these those through under until where which while would should usually always often "
    "después entre porque cuando sobre donde están tienen forman además mismo otras".split()
)


# --- made-up replies, the same for the same request on either side ------------------------------


class Responder:
    """Answers every request of one sample from its text; `short_chats`: each conversation
    uses under half of its terms the first time it is asked, all of them the second time."""

    def __init__(self, content: str, *, short_chats: bool) -> None:
        self.content = content
        self.sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", content) if s.strip()]
        words = [w for w in re.findall(r"[^\W\d_]+", content.lower()) if len(w) >= 6]
        counts = Counter(w for w in words if w not in STOP)
        self.terms = sorted(counts, key=lambda w: (-counts[w], words.index(w)))
        self.short_chats = short_chats
        self.asked: Counter[str] = Counter()
        self.replies: list[str] = []  # the content of each answer, in order

    def sentence(self, term: str, limit: int = 18) -> str:
        found = next((s for s in self.sentences if term.lower() in s.lower()), term)
        return " ".join(found.lstrip("# ").split()[:limit])

    def __call__(self, sent: dict[str, Any]) -> dict[str, Any]:
        from tests.fakes.openai_server import completion

        name = sent["response_format"]["json_schema"]["name"]
        user = sent["messages"][-1]["content"]
        content: dict[str, Any]
        if name == "flashcards":
            content = {"flashcards": self.cards(user)}
        elif name == "lesson_keywords":
            low, high = map(int, re.search(r"between (\d+) and (\d+)", user).groups())  # type: ignore[union-attr]
            content = {"keywords": self.terms[: (low + high) // 2]}
        elif name == "lesson_topics":
            terms = _terms_list(user)
            content = {
                "topics": [
                    {"name": f"Tema {k // 8 + 1}", "keywords": terms[k : k + 8]}
                    for k in range(0, len(terms), 8)
                ]
            }
        elif name.startswith("lesson_vocabulary"):
            content = {
                "vocabulary": [
                    self.entry(t, english=name.endswith("english")) for t in _terms_list(user)
                ]
            }
        else:
            terms = _conversation_terms(user)
            self.asked[terms[0]] += 1
            if self.short_chats and self.asked[terms[0]] == 1:
                terms = terms[: len(terms) // 2 - 1] or terms[:1]
            content = {"conversation": self.chat(terms)}
        body = dict(completion(content).body)
        self.replies.append(body["choices"][0]["message"]["content"])
        return body

    def cards(self, user: str) -> list[dict[str, str]]:
        words = len(self.content.split())
        count = min(max(words // 20, 10), 40)
        topic = re.search(r"Requested topic: (.*)", user).group(1)  # type: ignore[union-attr]
        levels = ("beginner", "intermediate", "expert")
        return [
            {
                "front": t,
                "back": t,
                "difficulty": levels[k % 3],
                "example": self.sentence(t),
                "pronunciation": f"/{t}/",
                "topic": f"Topic {k % 4 + 1}" if topic == "AI Selection" else topic,
            }
            for k, t in enumerate(self.terms[:count])
        ]

    def entry(self, term: str, *, english: bool) -> dict[str, str]:
        example = self.sentence(term)
        definition = " ".join(example.split()[:12])
        if english:
            return {
                "english_term": term,
                "definition": definition,
                "native_translation": term,
                "example_sentence_target": example,
                "example_sentence_native": example,
            }
        return {
            "target_term": term,
            "definition": definition,
            "target_translation": term,
            "example_sentence_target_language": example,
            "example_sentence_native": example,
        }

    def chat(self, terms: list[str]) -> list[dict[str, str]]:
        turns = 10
        per = max(1, math.ceil(len(terms) / turns))
        lines = []
        for k in range(turns):
            part = terms[k * per : (k + 1) * per] or terms[-1:]
            said = " and ".join(part)
            lines.append(
                {
                    "speaker": "Assistant",
                    "message": f"Let's practise {said}: what does it mean "
                    "in this lesson, and where would you use it?",
                }
                if k % 2 == 0
                else {
                    "speaker": "User",
                    "message": f"I think {said} is used when we talk about "
                    "the main idea of the text, like in the example.",
                }
            )
        return lines


def _terms_list(user: str) -> list[str]:
    terms: list[str] = json.loads(re.search(r"Terms: (\[.*\])", user).group(1))  # type: ignore[union-attr]
    return terms


def _conversation_terms(user: str) -> list[str]:
    """`Terms: [...]` (main before issue 18) or `- term: definition` lines (after)."""
    if re.search(r"Terms: \[", user):
        return _terms_list(user)
    return [line[2:].split(": ", 1)[0] for line in user.splitlines() if line.startswith("- ")]


# --- running one tree's processors (in a child process whose sys.path starts at that tree) ------


async def collect(tree: Path, *, short_chats: bool) -> list[dict[str, Any]]:
    import redis.asyncio as aioredis
    from loguru import logger

    from tests.fakes.fixtures import stand_ins, users_table
    from tests.fakes.openai_server import Scripted
    from tests.support.processor_job import ProcessorJob

    logger.remove()
    records: list[dict[str, Any]] = []
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        for sample, spec in SAMPLES.items():
            content = (SAMPLES_DIR / spec["file"]).read_text(encoding="utf-8")
            data = {k: v for k, v in spec.items() if k != "file"}
            data.update(content=content, userId=USER_ID)
            for job_name in JOBS:
                if job_name == "generate-flashcards":
                    from processors.generate_flashcards import build
                else:
                    from processors.generate_lesson import build
                responder = Responder(content, short_chats=short_chats)
                async with stand_ins(users_table(USER_ID)) as world:
                    world.openai.script(*(Scripted(200, responder) for _ in range(500)))
                    processor = build(world.env)
                    job = ProcessorJob(processor, redis, data)
                    try:
                        await job.attempt()
                    finally:
                        await redis.delete(job.state_key)
                        assert processor.aclose is not None
                        await processor.aclose()
                    requests = world.openai.chat_requests
                    assert len(requests) == len(responder.replies)
                    for request, reply in zip(requests, responder.replies, strict=True):
                        body = request.body
                        records.append(
                            {
                                "sample": sample,
                                "job": job_name,
                                "step": body["response_format"]["json_schema"]["name"],
                                "messages": body["messages"],
                                "schema": body["response_format"]["json_schema"]["schema"],
                                "reply": reply,
                            }
                        )
    finally:
        await redis.aclose()
    return records


def run_tree(tree: Path, *, short_chats: bool) -> list[dict[str, Any]]:
    args = [sys.executable, str(Path(__file__).resolve()), "--collect", str(tree)]
    if short_chats:
        args.append("--short-chats")
    out = subprocess.run(args, cwd=tree, check=True, capture_output=True, text=True).stdout
    records: list[dict[str, Any]] = json.loads(out)
    return records


# --- counting -----------------------------------------------------------------------------------


def count(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, int]]:
    from bpe_openai import get_encoding

    encoding = get_encoding("o200k_base")

    def n(text: str) -> int:
        return len(encoding.encode(text))

    totals: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        t = totals.setdefault((r["sample"], r["job"]), Counter())
        t["calls"] += 1
        t["input"] += 3 + sum(3 + n(m["role"]) + n(m["content"]) for m in r["messages"])
        t["schema"] += n(json.dumps(r["schema"], separators=(",", ":")))
        t["output"] += n(r["reply"])
    return totals


def cost(t: dict[str, int], *, schema: bool = False) -> float:
    return ((t["input"] + t["schema"] * schema) * PRICE_IN + t["output"] * PRICE_OUT) / 1e6


def table(
    before: dict[tuple[str, str], dict[str, int]],
    after: dict[tuple[str, str], dict[str, int]],
    title: str,
) -> str:
    lines = [
        f"### {title}",
        "",
        "| input | job | calls | input | output (est.) | input + output | change | "
        "with schema (approx.) | $ change |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sums = {job: (Counter[str](), Counter[str]()) for job in JOBS}
    for job in JOBS:
        for sample in SAMPLES:
            b, a = before[(sample, job)], after[(sample, job)]
            sums[job][0].update(b)
            sums[job][1].update(a)
            lines.append(_row(sample, job, b, a))
        lines.append(_row("**all five**", job, *sums[job]))
    return "\n".join(lines)


def _row(sample: str, job: str, b: dict[str, int], a: dict[str, int]) -> str:
    tb, ta = b["input"] + b["output"], a["input"] + a["output"]
    sb, sa = tb + b["schema"], ta + a["schema"]
    return (
        f"| {sample} | {job} | {b['calls']} → {a['calls']} | {b['input']} → {a['input']} | "
        f"{b['output']} → {a['output']} | {tb} → {ta} | {_pct(tb, ta)} | {sb} → {sa} "
        f"({_pct(sb, sa)}) | {_pct(cost(b), cost(a))} |"
    )


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main", help="the git ref to compare with (main)")
    parser.add_argument("--collect", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--short-chats", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collect:
        sys.path.insert(0, str(args.collect))
        print(json.dumps(asyncio.run(collect(args.collect, short_chats=args.short_chats))))
        return

    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.ref],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="prompt-tokens-") as tmp:
        archive = subprocess.run(
            ["git", "archive", args.ref, "processors", "worker", "contract", "tests"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before = count(run_tree(Path(tmp), short_chats=False))
        before_short = count(run_tree(Path(tmp), short_chats=True))
    after = count(run_tree(ROOT, short_chats=False))
    after_short = count(run_tree(ROOT, short_chats=True))
    print(f"Tokens per job, o200k_base: {args.ref} ({commit}) → this tree\n")
    print(table(before, after, "typical: every conversation uses its terms at once"))
    print()
    print(table(before_short, after_short, "worst: every conversation is short the first time"))


if __name__ == "__main__":
    main()
