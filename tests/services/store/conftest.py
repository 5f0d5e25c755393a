"""The Redis Cluster fixtures (tests/support/redis_cluster.py) for the store's tests."""

from tests.support.redis_cluster import (  # noqa: F401 (pytest finds fixtures by name)
    _module_redis_cluster,
    fresh_redis_cluster,
    redis_cluster,
)
