"""One real stack for the gateway's integration tests: redis-server, the KVStore over it, a local
Ray cluster with two worker actors (tiny-random), and the gateway on a loopback port."""

import pytest

from services.gateway.client import InferenceClient
from services.store.redis_process import RedisProcess
from services.store.server import StoreConfig, StoreServer
from tests.services.gateway.support import BLOCK_TOKENS
from tests.support.stack import gateway_over
from workers.worker import WorkerConfig


@pytest.fixture(scope="package")
def stack():
    redis = RedisProcess().start()
    store = StoreServer(StoreConfig(backend=redis.url, port=0))
    store.start()
    # fp16: tiny-random's random logits have near-ties that int8 noise can flip, and these
    # tests compare greedy outputs exactly (int8 on SmolLM2 is tested in tests/workers).
    # No node tier and a pinned fetch plan: these tests follow blocks from one worker to another
    # through the store, as between nodes (tests/workers/test_node_tier.py covers the node tier).
    worker = WorkerConfig(
        model="tiny-random",
        codec="fp16",
        block_tokens=BLOCK_TOKENS,
        store_target=store.target,
        node_tier=False,
        fetch_plan="fetch",
    )
    try:
        with gateway_over(store.target, worker, workers=2, grace_s=5) as gateway:
            yield gateway
    finally:
        store.stop(0)
        redis.close()


@pytest.fixture
def client(stack):
    with InferenceClient(stack.target, timeout_s=120) as c:
        yield c
