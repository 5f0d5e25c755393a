"""Bounded sessions across workers: two KVWorkers in this process share one real KVStore (gRPC,
memory backend). A windowed session started on one worker continues on the other from the sink
and window blocks in the store, with the output the first worker would have given."""

import pytest

from kvpool.errors import InvalidArgument
from tests.support.work import make_worker, run
from workers.api import PromptInput, SamplingParams, WorkRequest
from workers.kv.hashing import block_key

TEXT = (
    "A bounded session keeps its first tokens and its most recent ones, so a long conversation "
    "runs in flat memory on any worker. "
) * 10
WINDOW = {"max_cache_tokens": 68, "sink_tokens": 4}  # block_tokens 16: keeps 52 after eviction


def test_a_windowed_session_continues_on_another_worker(pair, store):
    a, b = pair
    params = SamplingParams(max_new_tokens=40)
    turn1 = tuple(a.prompts.encode_input(PromptInput(prompt="Session one. " + TEXT)))
    first = run(a, WorkRequest(turn1, params, **WINDOW))
    assert first.usage.evicted_tokens > 0
    assert a.flush(10)
    history = [*turn1, *first.token_ids]
    turn2 = tuple(a.prompts.encode_input(PromptInput(prompt=" And then? " + TEXT[:200]), history))

    on_b = run(b, WorkRequest(turn2, params, **WINDOW))
    on_a = run(a, WorkRequest(turn2, params, **WINDOW))  # what the first worker would give
    assert on_b.token_ids == on_a.token_ids
    # B rebuilt the sinks and the window from the store instead of recomputing the history
    # (A then started later still, from the blocks B had stored for the new input).
    assert on_b.usage.cached_store_tokens >= len(history) - 16
    assert on_a.usage.cached_tokens >= on_b.usage.cached_tokens
    assert on_b.usage.evicted_tokens == on_a.usage.evicted_tokens > first.usage.evicted_tokens


def test_failover_mid_generation_resumes_the_windowed_stream(pair):
    a, b = pair
    params = SamplingParams(max_new_tokens=90)
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Failover. " + TEXT)))
    whole = run(a, WorkRequest(prompt, params, **WINDOW))
    assert a.flush(10)
    # A "died" after 50 tokens: B resumes from the blocks A wrote, recomputing the tail.
    resumed = run(b, WorkRequest(prompt, params, prior_output=whole.token_ids[:50], **WINDOW))
    rerun = run(a, WorkRequest(prompt, params, prior_output=whole.token_ids[:50], **WINDOW))
    assert resumed.token_ids == rerun.token_ids
    assert resumed.usage.cached_store_tokens > 0


def test_windowed_blocks_are_keyed_apart_and_the_plain_prefix_is_shared(pair, store):
    a, b = pair
    params = SamplingParams(max_new_tokens=4)
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Shared prefix. " + TEXT)))
    run(a, WorkRequest(prompt, params, **WINDOW))
    assert a.flush(10)
    # An unbounded request reuses only the blocks computed before the first eviction (the first
    # 4 blocks: 64 tokens fit the 68-token bound); the later ones depend on the window.
    plain = run(b, WorkRequest(prompt, params))
    assert plain.usage.cached_tokens == 64
    chain = b.namespace("")
    from workers.kv.hashing import chain_hashes

    plain_keys = [block_key(h) for h in chain_hashes(chain, prompt)]
    # b has now stored every plain block; the windowed run stored its own, under other keys.
    assert b.flush(10)
    assert store.backend.lookup(plain_keys) == len(plain_keys)


def test_an_impossible_window_is_a_clear_error(pair):
    a, _ = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt=TEXT)))
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(InvalidArgument, match="at least sink_tokens \\+ 2 x block_tokens = 44"):
        list(a.generate(WorkRequest(prompt, params, max_cache_tokens=40, sink_tokens=12)))
    with pytest.raises(InvalidArgument, match="sink_tokens must be 0 \\(no sinks\\) or positive"):
        list(a.generate(WorkRequest(prompt, params, sink_tokens=-1)))


@pytest.mark.model
def test_smollm2_windowed_session_on_another_worker_matches_a_fresh_computation(store):
    a = make_worker(store, "smol-a", model="smollm2-135m", codec="int8", block_tokens=64)
    b = make_worker(store, "smol-b", model="smollm2-135m", codec="int8", block_tokens=64)
    try:
        window = {"max_cache_tokens": 256, "sink_tokens": 4}
        params = SamplingParams(max_new_tokens=32)
        turn1 = tuple(a.prompts.encode_input(PromptInput(prompt=TEXT * 2)))
        first = run(a, WorkRequest(turn1, params, **window))
        assert a.flush(30)
        history = [*turn1, *first.token_ids]
        turn2 = tuple(a.prompts.encode_input(PromptInput(prompt=" Why is that useful?"), history))
        on_b = run(b, WorkRequest(turn2, params, **window))
        fresh = run(b, WorkRequest(turn2, params, read_cache=False, **window))
        assert on_b.usage.cached_store_tokens > 256 and fresh.usage.cached_tokens == 0
        # int8 blocks against an exact recomputation: the measured agreement is 1.0 on SmolLM2.
        assert on_b.token_ids == fresh.token_ids
    finally:
        a.close()
        b.close()
