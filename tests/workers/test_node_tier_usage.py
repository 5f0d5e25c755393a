"""Which tier a start came from is reported as that tier: two workers in this process on one
real Ray node tier and one real KVStore. A plain prompt and a windowed session that the first
worker cached reach the second worker from the node tier, and its usage says so (the windowed
path once counted them as store tokens)."""

import contextlib
import shutil
import tempfile

import pytest
import ray

from tests.support.work import make_worker, run
from workers.api import PromptInput, SamplingParams, WorkRequest
from workers.node_tier import start_node_tiers, stop_node_tiers

pytestmark = pytest.mark.integration

TEXT = "A node tier holds the blocks every worker on this machine computed. " * 12
WINDOW = {"max_cache_tokens": 68, "sink_tokens": 4}  # block_tokens 16


@pytest.fixture(scope="module")
def pair(store):
    ray_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    tiers = start_node_tiers(64 << 20)
    a = make_worker(store, "node-a", node_tier=True)
    b = make_worker(store, "node-b", node_tier=True)
    try:
        assert a.node is not None and b.node is not None
        yield a, b
    finally:
        a.close()
        b.close()
        stop_node_tiers(tiers)
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_a_plain_prefix_from_the_node_tier_is_reported_as_node_tokens(pair):
    a, b = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Plain. " + TEXT)))
    params = SamplingParams(max_new_tokens=4)
    first = run(a, WorkRequest(prompt, params))
    assert a.flush(30)
    again = run(b, WorkRequest(prompt, params))
    full = len(prompt) // 16 * 16
    assert again.usage.plan == "fetch"
    assert again.usage.cached_node_tokens >= full - 16
    assert again.usage.cached_store_tokens == 0 and again.usage.cached_local_tokens == 0
    assert again.token_ids == first.token_ids


def test_a_windowed_start_from_the_node_tier_is_reported_as_node_tokens(pair):
    a, b = pair
    params = SamplingParams(max_new_tokens=24)
    turn1 = tuple(a.prompts.encode_input(PromptInput(prompt="Windowed. " + TEXT)))
    first = run(a, WorkRequest(turn1, params, **WINDOW))
    assert first.usage.evicted_tokens > 0
    assert a.flush(30)
    history = [*turn1, *first.token_ids]
    turn2 = tuple(a.prompts.encode_input(PromptInput(prompt=" Next."), history))
    on_b = run(b, WorkRequest(turn2, params, **WINDOW))
    on_a = run(a, WorkRequest(turn2, params, **WINDOW))
    assert on_b.token_ids == on_a.token_ids
    assert on_b.usage.plan == "fetch"
    assert on_b.usage.cached_node_tokens >= len(history) - 32
    assert on_b.usage.cached_store_tokens == 0
    stats = b.stats()
    assert stats.node_errors == 0 and stats.store_errors == 0
