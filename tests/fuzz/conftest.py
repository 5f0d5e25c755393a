"""A small real stack for fuzzing requests: the KVStore (memory backend), a local Ray with one
tiny-random worker, and the gateway, all on loopback ports chosen here."""

import contextlib
import shutil
import tempfile

import pytest

from services.gateway.pool import PoolConfig
from services.gateway.server import GatewayServer, GatewaySettings
from services.store.server import StoreConfig, StoreServer
from workers.actor import ActorResources
from workers.worker import WorkerConfig


@pytest.fixture(scope="package")
def gateway():
    ray = pytest.importorskip("ray")
    store = StoreServer(StoreConfig(port=0, max_memory_bytes=64 << 20, grace_s=0))
    store.start()
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    worker = WorkerConfig(
        model="tiny-random", codec="fp16", block_tokens=16, store_target=store.target
    )
    server = GatewayServer(
        GatewaySettings(
            store_target=store.target,
            port=0,
            pool=PoolConfig(workers=1, worker=worker, resources=ActorResources(num_cpus=1)),
            grace_s=2,
        )
    )
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop(1)
        ray.shutdown()
        store.stop(0)
        shutil.rmtree(ray_dir, ignore_errors=True)
