"""AWS for the audio job types: credentials from the environment, boto3 clients, error classes.

Credentials and region come from the environment mapping the processors are built from
(INTEROP §6 names): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (both, or the job types are
disabled), AWS_SESSION_TOKEN when temporary credentials are used, AWS_REGION (us-east-1).
Endpoints are botocore's business: AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 and
AWS_ENDPOINT_URL_POLLY are read by botocore itself from the process environment (tests and
sovereign clouds use them), so no `endpoint_url` is ever passed here that would hide them.

boto3's own retries are off (one HTTP request per call): BullMQ's attempts and the
provider's breaker and rate limit (worker.providers) decide what happens after a failure.
How a failure maps onto the worker's classes (`classify`):

    throttling (ThrottlingException, TooManyRequests, SlowDown, HTTP 429)
                                          → RateLimited (Retry-After, else DEFAULT_RETRY_AFTER_S)
    5xx, timeouts, connection errors      → RetryableJobError
    a request botocore refuses to send (ParamValidationError: a parameter out of range,
      of the wrong type, missing)         → PermanentJobError (the same request, the same)
    rejected credentials (401/403 codes)  → PermanentJobError naming the key variables
    any other 4xx                         → PermanentJobError with AWS's code and message
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.shared.retry_after import retry_after_s
from worker.errors import JobError, PermanentJobError, RateLimited, RetryableJobError

KEY_ID_VARIABLE = "AWS_ACCESS_KEY_ID"
SECRET_VARIABLE = "AWS_SECRET_ACCESS_KEY"
TOKEN_VARIABLE = "AWS_SESSION_TOKEN"
REGION_VARIABLE = "AWS_REGION"
DEFAULT_REGION = "us-east-1"
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
# Throttling without Retry-After (Polly sends none): its limits are requests per second.
DEFAULT_RETRY_AFTER_S = 1.0

_THROTTLING = frozenset(
    {"ThrottlingException", "Throttling", "ThrottledException", "TooManyRequestsException",
     "RequestLimitExceeded", "SlowDown"}
)  # fmt: skip
_BAD_CREDENTIALS = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "InvalidClientTokenId",
     "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDeniedException", "AccessDenied",
     "ExpiredToken", "ExpiredTokenException", "MissingAuthenticationToken"}
)  # fmt: skip


@dataclass(frozen=True)
class AwsSettings:
    key_id: str = field(repr=False)
    secret: str = field(repr=False)
    region: str = DEFAULT_REGION
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AwsSettings | None:
        """The settings, or None when either key variable is missing (the types are off)."""
        key_id = env.get(KEY_ID_VARIABLE, "").strip()
        secret = env.get(SECRET_VARIABLE, "").strip()
        if not key_id or not secret:
            return None
        region = env.get(REGION_VARIABLE, "").strip() or DEFAULT_REGION
        token = env.get(TOKEN_VARIABLE, "").strip() or None
        return cls(key_id, secret, region, token)

    def session(self) -> Any:
        """A boto3 Session with these credentials and region: one per processor, whose
        clients are made from it (`boto3_client`)."""
        import boto3  # only when an AWS job type is built: ~20 MB the others never need

        return boto3.session.Session(
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            aws_session_token=self.session_token,
            region_name=self.region,
        )


def boto3_client(session: Any, service: str, **config: Any) -> Any:
    """A boto3 client of `session` (thread-safe; its calls block, so callers run them in a
    thread), with boto3's own retries off and our timeouts."""
    from botocore.config import Config

    return session.client(
        service,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            **config,
        ),
    )


def classify(exc: BaseException, service: str, provider: str) -> JobError:
    """What `exc`, raised by a boto3 call to `service` ("Amazon Polly"), means for the job."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        ParamValidationError,
        ReadTimeoutError,
    )

    if isinstance(exc, NoCredentialsError):
        return PermanentJobError(f"{service}: no credentials: set {KEY_ID_VARIABLE} and "
                                 f"{SECRET_VARIABLE}")  # fmt: skip
    if isinstance(exc, ConnectionError | HTTPClientError | ReadTimeoutError):
        return RetryableJobError(f"Could not reach {service}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ParamValidationError):  # before the BotoCoreError catch-all
        return PermanentJobError(f"{service} call refused by botocore: {exc}")
    if isinstance(exc, BotoCoreError):
        return RetryableJobError(f"{service} call failed: {type(exc).__name__}: {exc}")
    if not isinstance(exc, ClientError):
        return RetryableJobError(f"{service} call failed: {type(exc).__name__}: {exc}")
    code, message, status, headers = error_of(exc)
    tag = f"HTTP {status} {code}".strip()
    if code in _THROTTLING or status == 429:
        return RateLimited(retry_after_s(headers, DEFAULT_RETRY_AFTER_S),
                           f"{service} throttled the call ({tag})",
                           provider=provider)  # fmt: skip
    if code in _BAD_CREDENTIALS or status in (401, 403):
        return PermanentJobError(
            f"{service} refused the credentials ({tag}): check {KEY_ID_VARIABLE} and "
            f"{SECRET_VARIABLE}: {message}"
        )
    if status >= 500 or status in (0, 408):
        return RetryableJobError(f"{service} is temporarily unavailable ({tag}): {message}")
    return PermanentJobError(f"{service} refused the request ({tag}): {message}")


def error_of(exc: Any) -> tuple[str, str, int, Mapping[str, str]]:
    """(error code, message, HTTP status, response headers) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")[:300]
    try:
        status = int(meta.get("HTTPStatusCode") or 0)
    except (TypeError, ValueError):
        status = 0
    return code, message, status, meta.get("HTTPHeaders") or {}
