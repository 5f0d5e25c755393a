"""A real Redis Cluster for tests: three masters, three replicas, on free loopback ports.

    def test_x(redis_cluster):         # RedisClusterProcess, emptied before the test: .url,
                                       # .master_ports(), .kill_master(), .wait_promoted()
    def test_y(fresh_redis_cluster):   # a cluster of its own, for tests that kill nodes

Starting six redis-server processes and joining them takes about two seconds, so `redis_cluster`
is shared by a module's tests (FLUSHALL between them); a test that breaks the cluster asks for
`fresh_redis_cluster`. The class lives in the package (`services.store.redis_cluster_process`)
because the store benchmark starts a cluster too.
"""

import shutil
from collections.abc import Iterator

import pytest

from services.store.redis_cluster_process import RedisClusterProcess

__all__ = ["RedisClusterProcess", "fresh_redis_cluster", "redis_cluster", "require_redis_cluster"]


def require_redis_cluster() -> None:
    """Skip the calling test when redis-server or redis-cli is missing."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")


@pytest.fixture(scope="module")
def _module_redis_cluster() -> Iterator[RedisClusterProcess]:
    require_redis_cluster()
    with RedisClusterProcess(masters=3, replicas=1) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(_module_redis_cluster: RedisClusterProcess) -> RedisClusterProcess:
    """The module's cluster, with no keys left by an earlier test."""
    _module_redis_cluster.flushall()
    return _module_redis_cluster


@pytest.fixture
def fresh_redis_cluster() -> Iterator[RedisClusterProcess]:
    """A cluster for this test alone (it may kill nodes)."""
    require_redis_cluster()
    with RedisClusterProcess(masters=3, replicas=1) as cluster:
        yield cluster
