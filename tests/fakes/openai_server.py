"""A local server speaking OpenAI's HTTP API for `POST /v1/chat/completions`, scripted per test.

Each request takes the next `Scripted` reply from the queue (`script(...)`); an empty queue
answers 500 and is counted in `unscripted`, so a test that calls more often than it expects
fails loudly. Bodies follow what api.openai.com sends (and the `openai` SDK parses): a
`chat.completion` with `usage`, `finish_reason` and `message.refusal`, or an error
`{"error": {"message", "type", "param", "code"}}` with the real headers (`retry-after`,
`x-ratelimit-reset-requests`, ...).

`response_format` is honoured the way the real API does it where a test can see it: a strict
`json_schema` that OpenAI would refuse (an object without `additionalProperties: false` or
with a property missing from `required`) is answered 400, and scripted content that does not
match the request's schema is answered 400 too (`schema_mismatches` records why), so a test
can never pass with a reply the real model could not have produced.

    async with FakeOpenAI() as fake:
        fake.script(rate_limited(retry_after_s=7), completion({"flashcards": [...]}))
        ...
        assert fake.calls == 2
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from tests.fakes import LocalServer, RecordedRequest, json_response

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Scripted:
    """One reply. `body` may be a callable of the request JSON (to echo e.g. the model)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (longer than the client timeout → timeout)


class FakeOpenAI(LocalServer):
    def __init__(self, *, api_key: str | None = None) -> None:
        """With `api_key`, a request carrying another bearer token gets OpenAI's 401."""
        super().__init__()
        self.api_key = api_key
        self.queue: deque[Scripted] = deque()
        # Answers every request once the queue is empty (an outage that ends at a set time,
        # a 429 that never lifts); None: such a request is unscripted.
        self.fallback: Callable[[], Scripted] | None = None
        self.unscripted = 0
        self.schema_mismatches: list[str] = []
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def script(self, *replies: Scripted) -> None:
        self.queue.extend(replies)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == CHAT_PATH]

    @property
    def calls(self) -> int:
        """How many chat completions were requested (successful or not)."""
        return len(self.chat_requests)

    def routes(self, app: web.Application) -> None:
        app.router.add_post(CHAT_PATH, self._chat)
        app.router.add_route("*", "/{tail:.*}", self._unknown)

    async def _unknown(self, request: web.Request) -> web.Response:
        return json_response(
            404,
            error_body(f"Invalid URL ({request.method} {request.path})", "invalid_request_error"),
        )

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            sent: Any = json.loads(await request.read() or b"null")
        except ValueError:
            sent = None
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return _scripted_response(invalid_api_key(), sent, self._next_id())
        if not isinstance(sent, dict) or "model" not in sent or "messages" not in sent:
            return json_response(
                400, error_body("you must provide a model and messages", "invalid_request_error")
            )
        schema_problem = _strict_schema_problem(sent.get("response_format"))
        if schema_problem:
            return json_response(
                400,
                error_body(
                    f"Invalid schema for response_format: {schema_problem}",
                    "invalid_request_error",
                    code="invalid_json_schema",
                    param="response_format",
                ),
            )
        if self.queue:
            reply = self.queue.popleft()
        elif self.fallback is not None:
            reply = self.fallback()
        else:
            self.unscripted += 1
            return json_response(
                500,
                error_body("fake openai: no scripted reply left for this request", "server_error"),
            )
        await self.pause(reply.delay_s)
        response_id = self._next_id()
        body = reply.body(sent) if callable(reply.body) else reply.body
        mismatch = _content_mismatch(sent.get("response_format"), reply.status, body)
        if mismatch:
            self.schema_mismatches.append(mismatch)
            return json_response(
                400,
                error_body(
                    f"fake openai: scripted content breaks the request's json_schema: {mismatch}",
                    "invalid_request_error",
                    code="fake_schema_mismatch",
                ),
            )
        return _scripted_response(Scripted(reply.status, body, reply.headers), sent, response_id)

    def _next_id(self) -> str:
        return f"{next(self._ids):06d}"


def _scripted_response(reply: Scripted, sent: Any, response_id: str) -> web.Response:
    body = reply.body
    if isinstance(body, dict) and body.get("object") == "chat.completion":
        body = {**body, "id": f"chatcmpl-fake{response_id}"}
        if not body.get("model") and isinstance(sent, dict):
            body["model"] = f"{sent.get('model')}-2024-07-18"
    headers = {
        "x-request-id": f"req_fake{response_id}",
        "openai-version": "2020-10-01",
        "openai-processing-ms": "42",
        **reply.headers,
    }
    return json_response(reply.status, body, headers)


# --- replies ---------------------------------------------------------------------------------


def completion(
    content: Any = None,
    *,
    refusal: str | None = None,
    finish_reason: str = "stop",
    prompt_tokens: int = 1200,
    completion_tokens: int = 800,
    cached_tokens: int = 0,
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
) -> Scripted:
    """A `chat.completion`. Non-string content is sent as its JSON text (what a strict
    json_schema reply looks like); a string is sent as is (e.g. a cut-off reply)."""
    text = (
        content
        if content is None or isinstance(content, str)
        else json.dumps(content, ensure_ascii=False)
    )
    body = {
        "id": "",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": refusal,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    return Scripted(200, body, {**_ratelimit_headers(), **(headers or {})}, delay_s)


def refused(text: str = "I'm sorry, but I can't assist with that request.", **kw: Any) -> Scripted:
    return completion(None, refusal=text, **kw)


def error_body(
    message: str, type_: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Scripted:
    return Scripted(status, error_body(message, type_, code=code, param=param), dict(headers or {}))


def rate_limited(
    retry_after_s: float | None = 20,
    *,
    retry_after_ms: float | None = None,
    reset_requests: str = "20s",
    reset_tokens: str = "1ms",
    limit_type: str = "requests",
) -> Scripted:
    """429 `rate_limit_exceeded` with the rate-limit headers OpenAI sends."""
    headers = {
        **_ratelimit_headers(remaining_requests=0),
        "x-ratelimit-reset-requests": reset_requests,
        "x-ratelimit-reset-tokens": reset_tokens,
    }
    if retry_after_s is not None:
        headers["retry-after"] = f"{retry_after_s:g}"
    if retry_after_ms is not None:
        headers["retry-after-ms"] = f"{retry_after_ms:g}"
    per = "requests per min (RPM)" if limit_type == "requests" else "tokens per min (TPM)"
    return error(
        429,
        f"Rate limit reached for gpt-4o-mini in organization org-fake on {per}: Limit 500, "
        "Used 500, Requested 1. Please try again in 20s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
        type_=limit_type,
        code="rate_limit_exceeded",
        headers=headers,
    )


def request_too_large() -> Scripted:
    return error(
        429,
        "Request too large for gpt-4o-mini in organization org-fake on tokens per min (TPM): "
        "Limit 200000, Requested 342389. The input or output tokens must be reduced in order "
        "to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
        type_="tokens",
        code="rate_limit_exceeded",
    )


def insufficient_quota() -> Scripted:
    return error(
        429,
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        type_="insufficient_quota",
        code="insufficient_quota",
    )


def invalid_api_key() -> Scripted:
    return error(
        401,
        "Incorrect API key provided: sk-test****. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


def server_error(status: int = 500) -> Scripted:
    return error(
        status,
        "The server had an error while processing your request. Sorry about that!",
        type_="server_error",
    )


def slow(delay_s: float, reply: Scripted | None = None) -> Scripted:
    """`reply` (a default completion) sent only after `delay_s`."""
    base = reply or completion({"flashcards": []})
    return Scripted(base.status, base.body, base.headers, delay_s)


def _ratelimit_headers(remaining_requests: int = 499) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-requests": str(remaining_requests),
        "x-ratelimit-remaining-tokens": "199000",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-reset-tokens": "300ms",
    }


# --- response_format ---------------------------------------------------------------------


def _strict_schema_problem(response_format: Any) -> str | None:
    """Why OpenAI would refuse this strict json_schema, or None."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    if not spec.get("strict"):
        return None
    schema = spec.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "the root of a strict schema must be an object"
    try:
        Draft202012Validator.check_schema(schema)
    except Exception as exc:
        return f"not a valid JSON Schema: {exc}"
    for where, node in _objects(schema, "#"):
        props = node.get("properties", {})
        if node.get("additionalProperties") is not False:
            return (
                f"In context={where}, 'additionalProperties' is required to be supplied "
                "and to be false"
            )
        missing = [name for name in props if name not in node.get("required", [])]
        if missing:
            return (
                f"In context={where}, 'required' is required to include every key in "
                f"properties; missing {missing}"
            )
    return None


def _objects(node: Any, where: str) -> Iterable[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield where, node
        for key, value in node.items():
            if key in ("properties", "$defs") and isinstance(value, dict):
                for name, sub in value.items():
                    yield from _objects(sub, f"{where}/{key}/{name}")
            elif key in ("items", "anyOf"):
                yield from _objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _objects(item, f"{where}/{i}")


def _content_mismatch(response_format: Any, status: int, body: Any) -> str | None:
    """Why a scripted 200 reply could not have come back for this json_schema, or None.

    Refusals, cut-off (`length`) and filtered replies are exempt: those are exactly the
    replies whose content does not follow the schema.
    """
    if status != 200 or not isinstance(body, dict) or body.get("object") != "chat.completion":
        return None
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    for choice in body.get("choices", []):
        message = choice.get("message", {})
        if message.get("refusal") or choice.get("finish_reason") != "stop":
            continue
        try:
            data = json.loads(message.get("content") or "")
        except ValueError:
            return "content is not JSON"
        error = best_match(Draft202012Validator(schema).iter_errors(data))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return f"{path}: {error.message}"
    return None
