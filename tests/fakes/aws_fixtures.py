"""AWS stand-ins as pytest fixtures (registered in tests/conftest.py) for the audio job types.

- `s3_server`: moto's S3 in server mode (ThreadedMotoServer, a real S3-compatible HTTP
  server), one per test session: it takes a second or two to import and start.
- `s3_bucket`: a bucket of its own per test on that server, and a boto3 client to read it back.
- `polly`: the SynthesizeSpeech stand-in (tests.fakes.polly_server), one per test.
- `aws_env`: the variables a processor's `build(env)` needs for both, plus the endpoint
  variables set in the process environment, where botocore reads them (the processors never
  pass an `endpoint_url`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.polly_server import KEY_ID, SECRET, FakePolly


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass(frozen=True)
class Bucket:
    name: str
    client: Any  # boto3 S3 client on the moto server

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name)
        return [o["Key"] for o in listed.get("Contents", [])]

    def read(self, key: str) -> tuple[bytes, dict[str, Any]]:
        got = self.client.get_object(Bucket=self.name, Key=key)
        return got["Body"].read(), got


@pytest.fixture
def s3_bucket(s3_server: str) -> Bucket:
    return new_bucket(s3_server)


def new_bucket(s3_server: str) -> Bucket:
    """A bucket of its own on the session's S3 server, with a client to read it back."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server,  # the test's own reader; the processors use the variables
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    name = f"audio-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


@pytest_asyncio.fixture
async def polly() -> AsyncIterator[FakePolly]:
    async with FakePolly() as fake:
        yield fake


def aws_variables(polly: FakePolly, s3_server: str, bucket: str) -> dict[str, str]:
    """Everything, endpoints included, for a worker started as a subprocess."""
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_S3_BUCKET": bucket,
        "AWS_ENDPOINT_URL_POLLY": polly.origin,
        "AWS_ENDPOINT_URL_S3": s3_server,
        # Neither a developer's ~/.aws files nor IMDS may change what the tests see.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def aws_env(
    polly: FakePolly, s3_server: str, s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    variables = aws_variables(polly, s3_server, s3_bucket.name)
    for name in ("AWS_ENDPOINT_URL_POLLY", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED"):  # fmt: skip
        monkeypatch.setenv(name, variables[name])
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return variables
