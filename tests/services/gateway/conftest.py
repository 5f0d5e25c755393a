"""One real stack for the gateway's integration tests: redis-server, the KVStore over it, a local
Ray cluster with two worker actors (tiny-random), and the gateway on a loopback port (gRPC, and
the OpenAI-compatible HTTP API on another)."""

import pytest

from services.gateway.client import InferenceClient
from services.stack import local_stack
from services.store.redis_process import RedisProcess
from services.store.server import StoreConfig
from tests.services.gateway.support import BLOCK_TOKENS
from workers.api import WorkerConfig


@pytest.fixture(scope="package")
def stack():
    redis = RedisProcess().start()
    store = StoreConfig(backend=redis.url, port=0, grace_s=0)
    # fp16: tiny-random's random logits have near-ties that int8 noise can flip, and these
    # tests compare greedy outputs exactly (int8 on SmolLM2 is tested in tests/workers).
    # No node tier and a pinned fetch plan: these tests follow blocks from one worker to another
    # through the store, as between nodes (tests/workers/test_node_tier.py covers the node tier).
    worker = WorkerConfig(
        model="tiny-random",
        codec="fp16",
        block_tokens=BLOCK_TOKENS,
        node_tier=False,
        fetch_plan="fetch",
    )
    try:
        with local_stack(worker, workers=2, store=store, grace_s=5, http_port=0) as stack:
            yield stack.gateway
    finally:
        redis.close()


@pytest.fixture
def client(stack):
    with InferenceClient(stack.target, timeout_s=120) as c:
        yield c
