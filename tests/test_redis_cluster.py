"""Redis Cluster (issue 17, item 4): the hash-tag rule for the prefix."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.settings import Settings

PREFIX = "{bull}"


def test_redis_cluster_true_refuses_a_prefix_without_a_hash_tag() -> None:
    for prefix in ("bull", "{}bull", "bull{"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"REDIS_CLUSTER": "true", "WORKER_PREFIX": prefix})
        assert str(caught.value).startswith(f"WORKER_PREFIX: {prefix!r} has no hash tag")
    for prefix in ("{bull}", "{ai}:jobs", "x{y}"):
        settings = Settings.from_env({"REDIS_CLUSTER": "true", "WORKER_PREFIX": prefix})
        assert settings.redis.cluster
    with pytest.raises(ConfigError, match="REDIS_CLUSTER: a cluster has database 0 only"):
        Settings.from_env(
            {"REDIS_CLUSTER": "true", "WORKER_PREFIX": PREFIX, "REDIS_URL": "redis://h:1/2"}
        )
