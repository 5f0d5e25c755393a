"""Session records live where block eviction cannot reach them (issue 23, section 4): a real
KVStore over gRPC, with the memory backend and with real redis-servers."""

import os

import pytest
import redis

from kvpool.errors import ResourceExhausted
from services.store.backends.memory import MemoryStore
from services.store.backends.split import SplitBackend
from services.store.client import StoreClient
from services.store.keys import SESSION_KEY_PREFIX
from services.store.server import StoreConfig, StoreServer
from tests.support.redis import RedisProcess, require_redis_server

pytestmark = pytest.mark.integration

SESSION = SESSION_KEY_PREFIX + "ab" * 32
BLOCK_BYTES = 64 << 10


def block(n: int) -> tuple[str, bytes]:
    return f"kvpool:blk:{n:064x}", os.urandom(BLOCK_BYTES)


def churn(client: StoreClient, megabytes: int) -> None:
    """Write `megabytes` of blocks, as other tenants' traffic would."""
    for start in range(0, megabytes * 16, 16):
        client.put_many([block(n) for n in range(start, start + 16)])


def test_blocks_that_fill_the_memory_backend_do_not_evict_a_session():
    """A session's key was evicted with the blocks (LRU over one keyspace): its next turn began
    anew and answered 200 with the history gone."""
    config = StoreConfig(port=0, max_memory_bytes=2 << 20, grace_s=0)
    with StoreServer(config) as server, StoreClient(server.target, timeout_s=10) as client:
        client.put_many([(SESSION, b"the history")], ttl_s=3600)
        churn(client, megabytes=8)  # four times the bound
        stats = client.stats()
        assert stats.evictions > 0  # blocks were evicted for room...
        assert client.get_many([SESSION]) == {SESSION: b"the history"}  # ...the session was not


def test_a_full_session_space_refuses_rather_than_evicts():
    config = StoreConfig(port=0, session_memory_bytes=4096, grace_s=0)
    with StoreServer(config) as server, StoreClient(server.target, timeout_s=10) as client:
        client.put_many([(SESSION, b"x" * 3000)])
        with pytest.raises(ResourceExhausted, match="--session-memory-bytes"):
            client.put_many([(SESSION_KEY_PREFIX + "cd" * 32, b"y" * 3000)])
        assert client.get_many([SESSION]) == {SESSION: b"x" * 3000}
        client.delete([SESSION])
        client.put_many([(SESSION_KEY_PREFIX + "cd" * 32, b"y" * 3000)])  # room again


def test_sessions_in_their_own_redis_outlive_the_blocks_lru():
    require_redis_server()
    with (
        RedisProcess(maxmemory_bytes=4 << 20) as blocks,
        RedisProcess(maxmemory_bytes=4 << 20, policy="noeviction") as sessions,
    ):
        config = StoreConfig(backend=blocks.url, session_backend=sessions.url, port=0, grace_s=0)
        with StoreServer(config) as server, StoreClient(server.target, timeout_s=10) as client:
            client.put_many([(SESSION, b"the history")], ttl_s=3600)
            churn(client, megabytes=16)
            assert client.stats().evictions > 0
            assert client.get_many([SESSION]) == {SESSION: b"the history"}
        assert redis.Redis.from_url(sessions.url).get(SESSION) == b"the history"
        assert redis.Redis.from_url(blocks.url).get(SESSION) is None  # never among the blocks


def test_a_mixed_call_is_answered_in_the_callers_order():
    split = SplitBackend(MemoryStore(1 << 20), MemoryStore(1 << 20, evict=False))
    keys = ["kvpool:blk:1", SESSION, "kvpool:blk:2"]
    assert split.put_many([(k, k.encode()) for k in keys], ttl_s=None) == 3
    assert split.get_many([SESSION, "kvpool:blk:2", "kvpool:blk:9"]) == [
        SESSION.encode(),
        b"kvpool:blk:2",
        None,
    ]
    assert split.sizes(keys) == [len(k) for k in keys]
    assert split.lookup(keys) == 3 and split.lookup(["kvpool:blk:1", "kvpool:blk:9", SESSION]) == 1
    assert split.sessions.get_many(["kvpool:blk:1"]) == [None]
    assert split.delete(keys) == 3
