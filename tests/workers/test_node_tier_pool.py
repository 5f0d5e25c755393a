"""The node tier belongs to the gateway's pool and outlives its workers: replacing a dead worker
must not end the tier (and every block in it) along the way."""

import contextlib
import shutil
import tempfile
import time

import pytest
import ray

from services.gateway.pool import WorkerPool
from services.gateway.settings import PoolConfig
from workers.api import ActorResources, WorkerConfig
from workers.node_tier import NodeTier

pytestmark = pytest.mark.integration


@pytest.fixture
def private_ray():
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_replacing_a_worker_keeps_the_node_tier_and_its_blocks(private_ray):
    config = PoolConfig(
        workers=1,
        worker=WorkerConfig(model="tiny-random", codec="fp16", block_tokens=16),
        resources=ActorResources(num_cpus=1, max_concurrency=4),
        node_tier_bytes=64 << 20,
    )
    pool = WorkerPool(config)
    pool.start()  # the pool creates, and so owns, this node's tier
    try:
        tier = NodeTier.for_this_node(timeout_s=10)
        assert tier is not None
        assert tier.put_many([("kvpool:blk:" + "ab" * 32, b"x" * 1000)]) == 1
        [worker] = pool.live()
        pool.mark_dead(worker)  # a replacement starts, and the pool looks for new nodes again
        deadline = time.monotonic() + 120
        while pool.replacements < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pool.replacements == 1
        # Before the fix the pool swapped its owning handle for one got by name, and Ray ended
        # the tier with its blocks: the same name then answered from a new, empty actor.
        again = NodeTier.for_this_node(timeout_s=10)
        assert again is not None
        assert len(again.refs(["kvpool:blk:" + "ab" * 32])) == 1
    finally:
        pool.close()
