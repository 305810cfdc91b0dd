"""One loguru setup for the process: text or JSON lines, job context on every line, no secrets."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from loguru import logger

# Environment variables whose values must never reach a log line, whatever prints them.
SECRET_VARIABLES = (
    "REDIS_PASSWORD",
    "EXPO_PUBLIC_OPENAI_API_KEY",
    "OPENAI_API_KEY",
    "SUPABASE_SERVICE_ROLE_KEY",
    "EXPO_PUBLIC_SUPABASE_ANON_KEY",
    "SUPABASE_ANON_KEY",
    "AZURE_SPEECH_KEY",
    "AZURE_VISION_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
)

CONTEXT_FIELDS = ("job_id", "job_name", "attempt")


class Redactor:
    """Replaces every known secret value with `***` in a finished log line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a URL is masked whole before the password inside it.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


# Redis URLs are not secret as a whole (the address helps an operator); the password in them is.
REDIS_URL_VARIABLES = ("REDIS_PUBLIC_URL", "REDIS_URL")


def secrets_from_env(env: Mapping[str, str], extra: Iterable[str | None] = ()) -> list[str]:
    values = [env.get(name, "") for name in SECRET_VARIABLES]
    for name in REDIS_URL_VARIABLES:
        values.extend(_url_passwords(env.get(name, "")))
    values.extend(v for v in extra if v)
    return [v for v in values if v]


def _url_passwords(url: str) -> list[str]:
    """The password in a URL, as written (percent-encoded) and decoded."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return [url]  # unparseable: mask it whole rather than guess where the password is
    return [password, unquote(password)] if password else []


class _InterceptHandler(logging.Handler):
    """Routes stdlib logging (bullmq, redis, aiohttp, httpx, openai) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _text_format(record: Any) -> str:
    extra = record["extra"]
    context = ""
    if extra.get("job_id"):
        context = "[{extra[job_id]}] "
    return "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | " + context + "{message}\n{exception}"


def _json_line(record: Any, redact: Redactor) -> str:
    payload: dict[str, Any] = {
        "ts": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        payload[key] = value
    if record["exception"] is not None:
        exc = record["exception"]
        payload["error"] = f"{exc.type.__name__ if exc.type else 'Error'}: {exc.value}"
    line = json.dumps(payload, ensure_ascii=False, default=str)
    return redact(line) + "\n"


def setup_logging(
    log_format: str = "text",
    level: str = "INFO",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Configure loguru once; returns the redactor so callers can mask text they print."""
    redact = Redactor(secrets)
    out = stream or sys.stderr
    logger.remove()

    if log_format == "json":

        def json_sink(message: Any) -> None:
            out.write(_json_line(message.record, redact))
            out.flush()

        logger.add(json_sink, level=level, backtrace=False, diagnose=False, catch=True)
    else:

        def text_sink(message: Any) -> None:
            out.write(redact(str(message)))
            out.flush()

        logger.add(
            text_sink,
            level=level,
            format=_text_format,
            backtrace=False,
            diagnose=False,  # diagnose would print local variables, secrets included
            colorize=False,
            catch=True,
        )

    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    logging.captureWarnings(True)
    return redact
