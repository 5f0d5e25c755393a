"""Issue 14, item 10: a hung Redis or a hung store (stopped with SIGSTOP: connections are
accepted by the kernel and never answered, unlike a refused connection) costs callers at most
their deadline, then nothing: calls fail fast as misses, and the store's /metrics still answers.
"""

import time
import urllib.request

import pytest

from kvpool.errors import KvpoolError
from services.store.client import StoreClient
from tests.faults.support import StoreProcess, metric, stopped, wait_for
from tests.support.redis import RedisProcess, require_redis_server

pytestmark = pytest.mark.integration

DEADLINE_S = 1.0
SLACK_S = 0.5  # scheduling on a busy 2-core machine


def _timed(call) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except KvpoolError as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.fixture
def redis_and_store():
    require_redis_server()
    with RedisProcess() as redis_process:
        store = StoreProcess(redis_process.url).start()
        try:
            yield redis_process, store
        finally:
            store.kill()


def test_a_hung_redis_costs_each_call_at_most_its_deadline_then_nothing(redis_and_store):
    redis_process, store = redis_and_store
    keys = [f"kvpool:blk:{i:064x}" for i in range(4)]
    with StoreClient(store.target, timeout_s=DEADLINE_S) as client:
        assert client.put_many([(keys[0], b"v")]) == 1
        with stopped(redis_process.pid):
            took = []
            for call in [
                lambda: client.lookup(keys),
                lambda: client.get_many(keys),
                lambda: client.put_many([(keys[1], b"w")]),
                lambda: client.get_many(keys),
                lambda: client.lookup(keys),
                lambda: client.get_many(keys),
            ]:
                seconds, error = _timed(call)
                assert error is not None, "a call answered although Redis is stopped"
                took.append(seconds)
            # Every call ends within its deadline; once the store's breaker is open, at once.
            assert max(took) <= DEADLINE_S + SLACK_S, took
            assert took[-1] <= 0.25, took
            # The metrics endpoint does not wait on the hung Redis.
            started = time.monotonic()
            text = store.metrics()
            assert time.monotonic() - started <= 1.0 + SLACK_S
            assert metric(text, "kvpool_store_backend_up") == 0
            assert metric(text, "kvpool_store_backend_circuit_open") == 1

        # Redis answers again: within a breaker cooldown the store serves again.
        def served() -> bool:
            try:
                return client.lookup(keys[:1]) == 1
            except KvpoolError:
                return False

        wait_for(served, 10, "the store to serve again after SIGCONT", interval_s=0.2)
        assert client.get_many(keys[:1]) == {keys[0]: b"v"}


def test_a_hung_store_costs_each_call_at_most_its_deadline_then_nothing(redis_and_store):
    _redis, store = redis_and_store
    keys = [f"kvpool:blk:{i:064x}" for i in range(4)]
    with StoreClient(store.target, timeout_s=DEADLINE_S) as client:
        assert client.put_many([(keys[0], b"v")]) == 1
        with stopped(store.pid):
            took = []
            for call in [
                lambda: client.get_many(keys),
                lambda: client.lookup(keys),
                lambda: client.get_many(keys),
                lambda: client.put_many([(keys[1], b"w")]),
            ]:
                seconds, error = _timed(call)
                assert error is not None, "a call answered although the store is stopped"
                took.append(seconds)
            assert max(took) <= DEADLINE_S + SLACK_S, took
            assert took[-1] <= 0.1, took  # the client's breaker: a miss at once

        def served() -> bool:
            try:
                return client.lookup(keys[:1]) == 1
            except KvpoolError:
                return False

        wait_for(served, 10, "the store to serve again after SIGCONT", interval_s=0.2)


def test_scrapes_do_not_pile_up_on_a_hung_redis(redis_and_store):
    """Scrapes every half second while Redis hangs: each answers within its 1 s wait."""
    redis_process, store = redis_and_store
    url = f"http://127.0.0.1:{store.metrics_port}/metrics"
    with stopped(redis_process.pid):
        for _ in range(5):
            started = time.monotonic()
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            assert time.monotonic() - started <= 1.0 + SLACK_S
            assert metric(text, "kvpool_store_backend_up") == 0
            time.sleep(0.5)
