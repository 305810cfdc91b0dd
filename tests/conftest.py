"""Session fixtures: a Redis we may use, Node producers (bullmq 5.61 and 6.7), key clean-up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.support.node_bridge import NodeBridge
from tests.support.redis_server import session_redis

# openai_fake, db, stand_in_env: the OpenAI and PostgREST stand-ins, for any module that asks.
pytest_plugins = ["tests.fakes.fixtures", "tests.fakes.aws_fixtures"]

NODE_VERSIONS = ("5", "6")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with session_redis() as url:
        yield url


@pytest.fixture(scope="session")
async def bridges(redis_url: str) -> AsyncIterator[dict[str, NodeBridge]]:
    started: dict[str, NodeBridge] = {}
    try:
        for version in NODE_VERSIONS:
            started[version] = await NodeBridge.start(version, redis_url)
        yield started
    finally:
        for bridge in started.values():
            await bridge.aclose()


@pytest.fixture(params=NODE_VERSIONS, ids=lambda v: f"bullmq{v}")
def node(request: pytest.FixtureRequest, bridges: dict[str, NodeBridge]) -> NodeBridge:
    """The web service's producer, at bullmq 5.61.0 and at 6.7.0."""
    return bridges[request.param]


@pytest.fixture
def node6(bridges: dict[str, NodeBridge]) -> NodeBridge:
    """The producer at the current bullmq 6.x only, for slow tests not worth running twice."""
    return bridges["6"]


@pytest.fixture
async def rclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def queue_name(request: pytest.FixtureRequest, rclient: aioredis.Redis) -> AsyncIterator[str]:
    """A queue name no other test uses; its keys (and only its keys) are removed afterwards."""
    from tests.support.harness import unique_queue

    tag = request.node.name.split("[")[0].removeprefix("test_")[:24].replace("_", "-")
    name = unique_queue(tag)
    yield name
    async for key in rclient.scan_iter(match=f"bull:{name}:*", count=500):
        await rclient.delete(key)
