"""A real redis-server for tests: `RedisProcess` (start, stop, restart on the same port).

The class lives in the package (`services.store.redis_process`) because the store benchmark
starts its own redis-server too; tests import it from here.
"""

import shutil

import pytest

from services.store.redis_process import RedisProcess, free_port

__all__ = ["RedisProcess", "free_port", "require_redis_server"]


def require_redis_server() -> None:
    """Skip the calling test when the redis-server binary is missing (make test installs it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
