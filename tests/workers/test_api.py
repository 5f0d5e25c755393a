"""The workers' torch-free records: what they fix and check where they are made."""

from workers.api import SamplingParams


def test_an_unseeded_sample_gets_one_seed_that_then_stays():
    params = SamplingParams(temperature=0.8)
    seeded = params.seeded()
    assert seeded.seed is not None and 0 <= seeded.seed < 2**63
    assert seeded.seeded() is seeded  # a fixed seed is never redrawn (failover continues it)
    assert params.seeded().seed != seeded.seed  # a fresh unseeded sample draws afresh


def test_greedy_and_seeded_params_are_left_alone():
    greedy = SamplingParams()
    assert greedy.seeded() is greedy and greedy.seed is None
    chosen = SamplingParams(temperature=0.8, seed=7)
    assert chosen.seeded() is chosen
