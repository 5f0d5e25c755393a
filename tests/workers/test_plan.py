"""The fetch plan's cost model and choice (pure: no torch, no I/O)."""

import pytest

from workers.plan import CachedRun, Estimates, TierCost, check_mode, choose

T = 64
BLOCK_BYTES = 64 * 1024  # 1 KiB per token


def estimates(prefill_tokens_per_s: float, store_bytes_per_s: float, node_bytes_per_s=10e9):
    est = Estimates("cpu", weight=1.0)
    est.observe_prefill(4096, 4096, 4096 / prefill_tokens_per_s)
    est.observe_latency("store", 0.001)
    est.observe_latency("node", 0.0005)
    est.observe_fetch("store", 100 << 20, 0.001 + (100 << 20) / store_bytes_per_s)
    est.observe_fetch("node", 100 << 20, 0.0005 + (100 << 20) / node_bytes_per_s)
    return est


def run(store_blocks=32, node_blocks=0, local_blocks=0, prompt=32 * T + 10):
    return CachedRun(T, prompt, local_blocks, node_blocks, store_blocks, BLOCK_BYTES)


def test_a_fast_link_fetches():
    # 1 GB/s moves a block in 66 us; prefilling its 64 tokens at 1,000 tokens/s takes 64 ms.
    plan = choose(run(), estimates(1_000, 1e9))
    assert plan.kind == "fetch" and plan.split_block == 0
    assert plan.predicted_s["fetch"] < plan.predicted_s["recompute"]


def test_a_slow_link_recomputes():
    # 1 MB/s: a block takes 66 ms to fetch and 6.4 ms to compute at 10,000 tokens/s.
    plan = choose(run(), estimates(10_000, 1e6))
    assert plan.kind == "recompute" and plan.split_block == 32


def test_a_link_as_fast_as_prefill_splits_near_the_middle():
    # Fetching a block costs what computing it costs: overlap both halves.
    per_block_s = T / 10_000
    plan = choose(run(), estimates(10_000, BLOCK_BYTES / per_block_s))
    assert plan.kind == "split"
    assert 12 <= plan.split_block <= 20
    assert plan.predicted_s["split"] < 0.8 * min(
        plan.predicted_s["fetch"], plan.predicted_s["recompute"]
    )


def test_the_node_tier_is_fetched_even_when_the_store_is_not_worth_it():
    # L1: 4 blocks; node tier: 8 fast blocks; then 20 store blocks over a slow link. The plan can
    # only recompute a leading run, so it recomputes everything or fetches node blocks too.
    est = estimates(10_000, 1e6, node_bytes_per_s=20e9)
    plan = choose(run(store_blocks=20, node_blocks=8, local_blocks=4), est)
    assert plan.kind == "recompute"
    fast = choose(run(store_blocks=0, node_blocks=28, local_blocks=4), est)
    assert fast.kind == "fetch" and fast.split_block == 4  # L1's blocks are never recomputed


def test_forced_modes_and_nothing_to_plan():
    est = estimates(10_000, 1e6)
    assert choose(run(), est, "fetch").kind == "fetch"
    assert choose(run(), estimates(1_000, 1e9), "recompute").kind == "recompute"
    assert choose(run(store_blocks=0, local_blocks=3), est).kind == "none"
    with pytest.raises(ValueError, match="auto, fetch, recompute"):
        check_mode("sometimes")
    with pytest.raises(ValueError, match="auto, fetch, recompute"):
        choose(run(), est, "maybe")


def test_estimates_follow_new_measurements_and_stay_bounded():
    est = Estimates("cpu", weight=0.5)
    assert est.tier_cost("store").bytes_per_s == pytest.approx(0.4e9)  # the prior
    est.observe_fetch("store", 10_000_000, 1.0)  # the first one replaces the prior
    first = est.tier_cost("store").bytes_per_s
    assert first == pytest.approx(10e6, rel=0.01)
    est.observe_fetch("store", 10_000_000, 0.1)
    assert first < est.tier_cost("store").bytes_per_s < 100e6  # halfway, in seconds per byte
    for length in range(2, 1 << 20, 997):  # lengths map to power-of-two buckets
        est.observe_prefill(length, length, length / 1000)
    assert len([k for k in est.snapshot() if k.startswith("prefill")]) <= 21
    assert est.prefill_s(0, 1000) == pytest.approx(1.0, rel=0.01)
    with pytest.raises(ValueError, match="tier"):
        est.observe_fetch("disk", 1, 1.0)


def test_prefill_predictions_use_the_nearest_measured_length():
    est = Estimates("cuda")
    assert est.prefill_s(0, 20_000) == pytest.approx(1.0)  # the CUDA prior, 20,000 tokens/s
    est.observe_prefill(512, 512, 0.5)
    est.observe_prefill(8192, 8192, 16.0)  # slower per token at length (attention)
    assert est.prefill_s(0, 600) == pytest.approx(600 / 1024)
    assert est.prefill_s(4096, 8192) == pytest.approx(4096 * 16.0 / 8192)


def test_tier_cost_validates():
    with pytest.raises(ValueError):
        TierCost(latency_s=-1, bytes_per_s=1)
    assert TierCost(0.01, 1e6).seconds(0) == 0.0


def test_a_link_that_slows_down_is_believed_at_once_one_that_speeds_up_gradually():
    est = Estimates("cpu", weight=0.5)
    est.observe_fetch("store", 100_000_000, 0.1)  # 1 GB/s
    est.observe_fetch("store", 100_000, 0.1)  # then 1 MB/s
    assert est.tier_cost("store").bytes_per_s == pytest.approx(1e6, rel=0.05)  # net of latency
    est.observe_fetch("store", 100_000_000, 0.1)  # fast again: the mean, not the last sample
    assert 1e6 < est.tier_cost("store").bytes_per_s < 1e9


def test_splits_that_overlap_badly_stop_being_chosen_then_are_tried_again():
    est = estimates(10_000, BLOCK_BYTES / (T / 10_000))  # a block fetched as fast as computed
    plan = choose(run(), est)
    assert plan.kind == "split" and plan.overlap_s > 0
    # The recompute and the fetch did not overlap at all: the phase took their sum.
    for _ in range(3):
        est.observe_split(plan.overlap_s, 2 * plan.overlap_s)
    assert est.split_factor() > 1.7
    worse = choose(run(), est)
    assert worse.kind in ("fetch", "recompute")
    assert est.snapshot()["split_factor"] == est.split_factor()
    kinds = []
    for _ in range(30):  # every plan that is not a split lets the factor decay towards 1...
        kinds.append(choose(run(), est).kind)
        est.observe_plan(kinds[-1])
    assert kinds[0] != "split" and "split" in kinds  # ...until a split is tried again
    assert est.split_factor() < 2.0


def test_a_split_faster_than_predicted_does_not_lower_the_factor_below_one():
    est = estimates(10_000, BLOCK_BYTES / (T / 10_000))
    est.observe_split(1.0, 0.2)
    assert est.split_factor() == 1.0
    est.observe_split(1.0, 1e6)  # a stall: believed, but bounded
    assert est.split_factor() <= 8.0
