"""Fixtures every suite may use: free loopback ports and a real redis-server.

    def test_x(redis_server):            # "redis://127.0.0.1:PORT/0", a fresh empty server
    def test_y(redis_process):           # the RedisProcess itself: .stop(), .restart(), .url
    def test_z(free_port):               # free_port() -> an unused loopback port

Each test gets its own redis-server (about 50 ms to start), so no test sees another's keys. It
listens on 127.0.0.1 only, never on 6379, with persistence off.
"""

from collections.abc import Callable, Iterator

import pytest

from services.stack import patient_ray_start
from tests.support.redis import RedisProcess, require_redis_server
from tests.support.redis import free_port as _free_port

# Every Ray cluster a test starts (in this process or a child, which inherits the environment)
# waits long enough for its GCS on a loaded CI machine.
patient_ray_start()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a loopback TCP port that was free a moment ago."""
    return _free_port


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A started redis-server, stopped (and its temp dir removed) after the test."""
    require_redis_server()
    with RedisProcess() as process:
        yield process


@pytest.fixture
def redis_server(redis_process: RedisProcess) -> str:
    """The URL of a fresh redis-server: `redis://127.0.0.1:PORT/0`."""
    return redis_process.url
