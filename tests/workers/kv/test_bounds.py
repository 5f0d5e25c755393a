"""`check_context`: the one place a request's fit to the model's context is judged and worded
(the gateway and the engine both call it)."""

import pytest

from kvpool.errors import InvalidArgument
from workers.kv.bounds import CacheWindow, check_context, check_window_fits


def test_a_prompt_and_its_new_tokens_must_fit_the_context():
    check_context(100, 28, 128, None)
    with pytest.raises(
        InvalidArgument,
        match="prompt of 100 tokens plus max_new_tokens=29 exceeds the model's context of 128",
    ):
        check_context(100, 29, 128, None)


def test_a_bounded_cache_only_needs_its_window_to_fit():
    window = CacheWindow(max_cache_tokens=128, sink_tokens=4, block_tokens=16)
    check_context(10_000, 1_000, 128, window)  # the sequence may outgrow the context
    with pytest.raises(InvalidArgument, match="max_cache_tokens=128 exceeds the model's context"):
        check_context(1, 1, 127, window)
    with pytest.raises(InvalidArgument, match="of 127 tokens"):
        check_window_fits(window, 127)
