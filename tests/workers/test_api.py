"""The workers' torch-free records: what they fix and check where they are made."""

import re

import pytest

from kvpool.errors import InvalidArgument
from workers.api import SamplingParams, WorkRequest


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


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token_ids": ()}, "prompt is empty"),
        ({"prior_output": (5,)}, "prior_output has 1 tokens, not below max_new_tokens=1"),
        ({"fetch_plan": "guess"}, "fetch_plan must be one of auto, fetch, recompute"),
        ({"prefill_timeout_s": -0.5}, "prefill_timeout_s must be >= 0 (0: no limit)"),
    ],
)
def test_a_work_request_refuses_what_no_worker_could_run(fields, message):
    request = {"token_ids": (1, 2, 3), "params": SamplingParams(max_new_tokens=1), **fields}
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        WorkRequest(**request)


def test_a_work_request_takes_an_empty_plan_as_the_workers_own():
    assert WorkRequest((1,), SamplingParams(), fetch_plan="").fetch_plan == ""
