"""processors.shared.aws.classify: what a boto3 failure means for the job."""

from __future__ import annotations

from botocore.exceptions import ParamValidationError, ReadTimeoutError

from processors.shared.aws import classify
from worker.errors import PermanentJobError, RetryableJobError


def test_a_request_botocore_refuses_to_send_is_permanent() -> None:
    refused = ParamValidationError(report="Invalid length for parameter Key, value: 0")
    error = classify(refused, "Amazon S3", "s3")
    assert isinstance(error, PermanentJobError), error
    assert "Invalid length for parameter Key" in str(error)


def test_a_read_timeout_is_still_retryable() -> None:
    error = classify(ReadTimeoutError(endpoint_url="https://s3"), "Amazon S3", "s3")
    assert isinstance(error, RetryableJobError) and not isinstance(error, PermanentJobError)


def test_throttling_waits_what_retry_after_says_else_the_default() -> None:
    from botocore.exceptions import ClientError

    from processors.shared.aws import DEFAULT_RETRY_AFTER_S
    from processors.shared.retry_after import retry_after_s
    from worker.errors import RateLimited

    def throttled(headers: dict[str, str]) -> ClientError:
        reply = {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                 "ResponseMetadata": {"HTTPStatusCode": 400, "HTTPHeaders": headers}}  # fmt: skip
        return ClientError(reply, "SynthesizeSpeech")  # type: ignore[arg-type]

    for headers, wait_s in (({"retry-after": "7"}, 7.0), ({}, DEFAULT_RETRY_AFTER_S)):
        error = classify(throttled(headers), "Amazon Polly", "polly")
        assert isinstance(error, RateLimited) and error.delay_s == wait_s, error
    assert retry_after_s({"Retry-After": "3"}, 9.0) == 3.0
    assert retry_after_s({"Retry-After": "soon"}, 9.0) == 9.0
    assert retry_after_s({"retry-after": "-5"}, 9.0) == 0.0
