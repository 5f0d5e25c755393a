"""One real stack for the gateway's integration tests: redis-server, the KVStore over it, a local
Ray cluster with two worker actors (tiny-random), and the gateway on a loopback port."""

import contextlib
import shutil
import tempfile

import pytest

from services.gateway.client import InferenceClient
from services.gateway.pool import PoolConfig
from services.gateway.server import GatewayServer, GatewaySettings
from services.store.redis_process import RedisProcess
from services.store.server import StoreConfig, StoreServer
from tests.services.gateway.support import BLOCK_TOKENS
from workers.actor import ActorResources
from workers.worker import WorkerConfig


@pytest.fixture(scope="package")
def stack():
    ray = pytest.importorskip("ray")
    redis = RedisProcess().start()
    store = StoreServer(StoreConfig(backend=redis.url, port=0))
    store.start()
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    # fp16: tiny-random's random logits have near-ties that int8 noise can flip, and these
    # tests compare greedy outputs exactly (int8 on SmolLM2 is tested in tests/workers).
    worker = WorkerConfig(
        model="tiny-random", codec="fp16", block_tokens=BLOCK_TOKENS, store_target=store.target
    )
    gateway = GatewayServer(
        GatewaySettings(
            store_target=store.target,
            port=0,
            pool=PoolConfig(workers=2, worker=worker, resources=ActorResources(num_cpus=1)),
            grace_s=5,
        )
    )
    try:
        gateway.start()
        yield gateway
    finally:
        with contextlib.suppress(Exception):
            gateway.stop(2)
        ray.shutdown()
        store.stop(0)
        redis.close()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture
def client(stack):
    with InferenceClient(stack.target, timeout_s=120) as c:
        yield c
