"""The one record of where a request's start came from: the tokens each tier gave, as usage."""

import pytest

from workers.hit import PrefixHit, TierTokens

T = 16


def test_a_plain_hit_gives_each_tier_its_blocks_tokens():
    hit = PrefixHit(T, "fetch", local_blocks=2, node_blocks=1, store_blocks=3)
    assert hit.tokens == 6 * T
    assert hit.by_tier(6 * T) == TierTokens(2 * T, T, 3 * T)


def test_tokens_the_engine_fed_again_are_the_caches_last():
    hit = PrefixHit(T, "fetch", local_blocks=1, node_blocks=1, store_blocks=0)
    assert hit.by_tier(2 * T - 1) == TierTokens(T, T - 1, 0)  # the node tier's block came last
    assert hit.by_tier(T - 3) == TierTokens(T - 3, 0, 0)
    assert hit.by_tier(10 * T) == TierTokens(T, T, 0)  # never more than the cache holds
    assert hit.by_tier(-1) == TierTokens()


def test_a_splits_recomputed_blocks_came_from_no_tier():
    hit = PrefixHit(T, "split", local_blocks=1, store_blocks=2, split_blocks=3,
                    recomputed_tokens=3 * T)  # fmt: skip
    assert hit.tokens == 6 * T
    assert hit.by_tier(6 * T) == TierTokens(T, 0, 2 * T)
    # A split whose fetch brought nothing: the last token fed again is a recomputed one.
    empty = PrefixHit(T, "split", local_blocks=1, split_blocks=2, recomputed_tokens=2 * T)
    assert empty.by_tier(3 * T - 1) == TierTokens(T, 0, 0)


def test_a_recompute_reports_only_l1():
    hit = PrefixHit(T, "recompute", local_blocks=1, recomputed_tokens=4 * T, stored_blocks=5)
    assert hit.tokens == T and hit.by_tier(T) == TierTokens(T, 0, 0)


def test_a_windowed_hits_tokens_are_shared_by_the_blocks_each_tier_gave():
    # 4 sink-and-recent blocks stand for 10 blocks' worth of tokens (the middle was evicted).
    hit = PrefixHit(T, "fetch", local_blocks=1, node_blocks=3, window_tokens=10 * T)
    tiers = hit.by_tier(10 * T)
    assert tiers.total == 10 * T and tiers.store == 0
    assert (tiers.local, tiers.node) == (10 * T // 4, 10 * T - 10 * T // 4)
    only_l1 = PrefixHit(T, "none", local_blocks=4, window_tokens=10 * T)
    assert only_l1.by_tier(10 * T) == TierTokens(10 * T, 0, 0)


def test_a_miss_has_no_tokens():
    assert PrefixHit(T).tokens == 0 and PrefixHit(T).by_tier(0) == TierTokens()


@pytest.mark.parametrize("kwargs", [{"plan": "maybe"}, {"local_blocks": -1}, {"block_tokens": 0}])
def test_a_hit_checks_itself(kwargs):
    with pytest.raises(ValueError):
        PrefixHit(**{"block_tokens": T, **kwargs})
