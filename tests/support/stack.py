"""A gateway with Ray worker actors over a given store: the core of every integration stack.

Each test package brings its own store (memory, Redis, a killable process) and its own worker
settings; starting a private local Ray and the gateway, and tearing both down, is the same.
"""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import ray

from services.gateway.pool import PoolConfig
from services.gateway.server import GatewayServer, GatewaySettings
from workers.api import ActorResources, WorkerConfig


@contextlib.contextmanager
def gateway_over(
    store_target: str, worker: WorkerConfig, *, workers: int, **settings: Any
) -> Iterator[GatewayServer]:
    """A started gateway on a free loopback port, with `workers` one-CPU actors on a local Ray.

    Ray runs in a temp dir of its own, so it never joins or disturbs another cluster.
    """
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=max(workers, 1),
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    gateway = GatewayServer(
        GatewaySettings(
            store_target=store_target,
            port=0,
            pool=PoolConfig(workers=workers, worker=worker, resources=ActorResources(num_cpus=1)),
            **settings,
        )
    )
    try:
        gateway.start()
        yield gateway
    finally:
        with contextlib.suppress(Exception):
            gateway.stop(2)
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
