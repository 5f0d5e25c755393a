"""One real stack for the fault tests: redis-server and `kvpool store serve` as child processes
(each can be killed and restarted on its port), a local Ray with two tiny-random workers, and the
gateway on a loopback port.

The workers run with no L1 (`l1_bytes=0`), so every cached token a request gets comes from the
store: each request exercises the path a fault breaks, and `cached_store_tokens` shows whether the
store answered.
"""

from dataclasses import dataclass

import pytest

from services.gateway.client import InferenceClient
from services.gateway.server import GatewayServer
from services.stack import local_stack
from services.store.redis_process import RedisProcess
from tests.faults.support import StoreProcess
from tests.support.redis import require_redis_server
from workers.api import WorkerConfig
from workers.kv.hashing import Namespace, tenant_salt

BLOCK_TOKENS = 16


@dataclass
class Stack:
    redis: RedisProcess
    store: StoreProcess
    gateway: GatewayServer
    client: InferenceClient

    def flush(self) -> None:
        """Wait until every worker has written its pending blocks (or given up on them)."""
        self.gateway.pool.flush(60)

    def namespace(self, tenant: str = "") -> Namespace:
        info = self.gateway.pool.info
        salt = tenant_salt(tenant, self.gateway.pool.config.worker.namespace_secret)
        return Namespace(info.fingerprint, info.codec, info.block_tokens, salt)


@pytest.fixture(scope="package")
def stack():
    require_redis_server()
    redis = RedisProcess().start()
    store = StoreProcess(redis.url).start()
    # fp16: tiny-random's random logits have near-ties that int8 noise can flip, and these tests
    # compare greedy outputs exactly. A short store timeout keeps outages quick to detect.
    worker = WorkerConfig(
        model="tiny-random",
        codec="fp16",
        block_tokens=BLOCK_TOKENS,
        store_timeout_s=2.0,
        l1_bytes=0,
        node_tier=False,  # the faults are the store's: every hit must go through it
        fetch_plan="fetch",
    )
    try:
        with (
            local_stack(
                worker, workers=2, store=store.target, store_timeout_s=2.0, grace_s=2
            ) as running,
            InferenceClient(running.gateway.target, timeout_s=120) as client,
        ):
            yield Stack(redis, store, running.gateway, client)
    finally:
        store.kill()
        redis.close()
