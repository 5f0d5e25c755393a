"""The node tier (L2): its byte-bounded LRU, and real Ray actors reading another worker's blocks
through it after that worker died, with no store at all."""

import contextlib
import shutil
import tempfile

import pytest
import ray

from tests.support.work import make_worker, run
from workers.actor import ActorResources, start_actor
from workers.api import SamplingParams, WorkDone, WorkerConfig, WorkRequest
from workers.kv.hashing import block_key, chain_hashes
from workers.node_tier import ByteLru, NodeTier, start_node_tiers, stop_node_tiers

BLOCK = 16


def test_byte_lru_evicts_least_recently_used_by_bytes():
    lru = ByteLru(capacity_bytes=100)
    assert lru.put("a", 1, 40) and lru.put("b", 2, 40)
    assert lru.get("a") == 1  # b is now the oldest
    assert lru.put("c", 3, 40)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.bytes == 80 and lru.evictions == 1
    assert not lru.put("huge", 4, 101)  # larger than the whole tier: refused, nothing evicted
    assert len(lru) == 2
    assert lru.delete("a") and lru.bytes == 40
    with pytest.raises(ValueError, match=">= 0 bytes"):
        ByteLru(-1)


@pytest.fixture(scope="module")
def cluster():
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    tiers = start_node_tiers(64 << 20)
    try:
        yield tiers
    finally:
        stop_node_tiers(tiers)
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def generate(handle, request: WorkRequest) -> WorkDone:
    items = [ray.get(ref, timeout=120) for ref in handle.generate.remote(request)]
    done = items[-1]
    assert isinstance(done, WorkDone)
    return done


def test_a_block_outlives_its_worker_in_the_node_tier(cluster):
    # No store: the only way b can find a's blocks is this node's tier.
    config = WorkerConfig(model="tiny-random", codec="fp16", block_tokens=BLOCK)
    resources = ActorResources(num_cpus=1, max_concurrency=4)
    a = start_actor(config, "node-a", resources)
    b = start_actor(config, "node-b", resources)
    prompt = tuple(range(3, 3 + 5 * BLOCK + 7))  # 5 full blocks and a tail
    params = SamplingParams(max_new_tokens=6)
    cold = generate(a, WorkRequest(prompt, params, read_cache=False))
    assert ray.get(a.flush.remote(30), timeout=60)
    namespace = ray.get(a.info.remote(), timeout=60)
    ray.kill(a, no_restart=True)  # the producer is gone; its blocks must not be

    forced = generate(b, WorkRequest(prompt, params, fetch_plan="fetch"))
    assert forced.usage.cached_node_tokens == 5 * BLOCK
    assert forced.usage.cached_store_tokens == forced.usage.cached_local_tokens == 0
    assert forced.usage.plan == "fetch"
    assert forced.token_ids == cold.token_ids

    stats = ray.get(b.stats.remote(), timeout=60)
    assert stats.cached_node_tokens == 5 * BLOCK
    assert stats.node is not None and stats.node.hits >= 5 and stats.node.blocks >= 5
    assert stats.plans["fetch"] == 1

    # The tier holds exactly the keys of the prompt's (and output's) full blocks.
    from workers.kv.hashing import Namespace, tenant_salt

    salt = tenant_salt("", config.namespace_secret)
    ns = Namespace(namespace.fingerprint, namespace.codec, namespace.block_tokens, salt)
    keys = [block_key(h) for h in chain_hashes(ns, prompt)]
    tier = NodeTier.for_this_node()
    assert tier is not None
    assert len(tier.refs(keys)) == 5
    assert [len(v) for v in tier.read(tier.refs(keys[:1]))] == [
        stats.node.bytes // stats.node.blocks
    ]
    ray.kill(b, no_restart=True)


def test_without_a_node_tier_a_worker_still_serves(cluster):
    config = WorkerConfig(model="tiny-random", codec="fp16", block_tokens=BLOCK, node_tier=False)
    c = start_actor(config, "node-c", ActorResources(num_cpus=1, max_concurrency=4))
    prompt = tuple(range(3, 3 + 2 * BLOCK + 1))
    done = generate(c, WorkRequest(prompt, SamplingParams(max_new_tokens=2)))
    assert done.usage.cached_node_tokens == 0
    assert ray.get(c.stats.remote(), timeout=60).node is None
    ray.kill(c, no_restart=True)


def test_a_store_hit_is_shared_with_the_node_through_its_tier(cluster, store):
    # The producer stands for another node (no tier here): its blocks reach this node only
    # through the store. The first worker here to read them hands them to the node's tier, so
    # its neighbour reads them from shared memory, not from the store again.
    producer = make_worker(store, "far-producer", node_tier=False)
    reader = make_worker(store, "near-reader")
    neighbour = make_worker(store, "near-neighbour")
    try:
        prompt = tuple(range(7, 7 + 5 * BLOCK + 3))  # 5 full blocks and a tail
        params = SamplingParams(max_new_tokens=6)
        cold = run(producer, WorkRequest(prompt, params, read_cache=False))
        assert producer.flush(30)

        first = run(reader, WorkRequest(prompt, params))
        assert first.usage.cached_store_tokens == 5 * BLOCK
        assert first.usage.cached_node_tokens == 0
        assert reader.flush(30)  # the copies to L1 and to the node tier are written behind
        assert reader.local.stats().blocks == 5  # L1 kept the fetched run too

        second = run(neighbour, WorkRequest(prompt, params))
        assert second.usage.cached_node_tokens == 5 * BLOCK
        assert second.usage.cached_store_tokens == 0
        assert second.token_ids == first.token_ids == cold.token_ids
    finally:
        for worker in (producer, reader, neighbour):
            worker.close()
