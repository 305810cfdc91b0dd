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
