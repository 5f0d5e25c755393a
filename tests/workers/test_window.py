"""Bounded caches (workers/window.py) in the engine: eviction, re-rotation, memory, rebuilding."""

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpool.errors import InvalidArgument
from workers.api import SamplingParams
from workers.kv.bounds import CacheWindow
from workers.kv.layout import recent_blocks
from workers.window import Rerotator, cache_bytes, check_windowable, rebuild

B = 16  # block tokens for tiny-random
TEXT = (
    "Long conversations make the cache grow without bound, so a bounded cache keeps the first "
    "few tokens and a window of the most recent ones. "
) * 12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_cache_tokens": 35, "sink_tokens": 4},
            "at least sink_tokens + 2 x block_tokens = 36",
        ),
        ({"max_cache_tokens": 40, "sink_tokens": 60}, "too small for sink_tokens=60"),
        ({"max_cache_tokens": -1}, "max_cache_tokens must be positive, got -1"),
        ({"max_cache_tokens": 0}, "max_cache_tokens must be positive, got 0"),
        ({"max_cache_tokens": 64, "sink_tokens": -4}, "sink_tokens must be 0 (no sinks)"),
        ({"max_cache_tokens": 64.0}, "max_cache_tokens must be an integer"),
    ],
)
def test_bad_windows_are_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        CacheWindow(block_tokens=B, **kwargs)


def test_eviction_schedule_depends_on_the_token_count_only():
    window = CacheWindow(max_cache_tokens=68, sink_tokens=4, block_tokens=B)  # keeps 52
    assert [window.evicted(n) for n in (0, 48, 52, 63, 64, 79, 80, 96)] == [
        0,
        0,
        0,
        0,
        12,
        12,
        28,
        44,
    ]
    assert not window.windowed_block(3) and window.windowed_block(4)
    assert window.blocks_for_state(3) == [0, 1, 2]
    # After 6 blocks (96 tokens, 44 evicted): sinks from block 0, then tokens 48..95.
    assert window.blocks_for_state(6) == [0, 3, 4, 5]


def test_rerotation_moves_a_key_to_another_position(tiny):
    rotary = tiny.model.model.rotary_emb
    rerotator = Rerotator(tiny.model)
    raw = torch.randn(1, 2, 5, tiny.model.config.head_dim)  # [batch, heads, tokens, head_dim]

    def at(position: int) -> torch.Tensor:
        positions = torch.arange(position, position + 5)[None]
        cos, sin = rotary(raw, positions)
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    assert torch.allclose(rerotator.rotate(at(40), -28), at(12), atol=1e-5)
    assert torch.allclose(rerotator.rotate(at(3), 17), at(20), atol=1e-5)
    assert not torch.allclose(at(40), at(12), atol=1e-2)  # the check above is not vacuous


def test_models_without_rotate_half_rope_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    with pytest.raises(InvalidArgument, match="needs a RoPE model of type"):
        check_windowable(gpt2)


def _run(engine, ids, window, max_new_tokens=80, **kwargs):
    """Generate with a window, recording cache sizes and cutting blocks as the worker does."""
    blocks: dict[int, torch.Tensor] = {}
    held: list[int] = []
    sizes: list[int] = []

    def on_forward(generation):
        fed = len(generation.fed_token_ids)
        full = fed // B
        have = max(blocks) + 1 if blocks else kwargs.get("past_tokens", 0) // B
        cut = recent_blocks(generation.cache, full - have, B, after=fed - full * B)
        blocks.update({have + i: block for i, block in enumerate(cut)})
        held.append(generation.cache.get_seq_length())
        sizes.append(cache_bytes(generation.cache))

    generation = engine.stream(
        ids, SamplingParams(max_new_tokens=max_new_tokens), window=window,
        on_forward=on_forward, **kwargs,
    )  # fmt: skip
    return generation.run(), blocks, held, sizes


def test_cache_stays_bounded_over_a_session_many_times_the_window(tiny_engine, tiny_prompts):
    window = CacheWindow(max_cache_tokens=68, sink_tokens=4, block_tokens=B)
    ids = tiny_prompts.encode(prompt=TEXT)[:200]
    result, blocks, held, sizes = _run(tiny_engine, ids, window, max_new_tokens=120)
    fed = len(ids) + 119
    assert fed >= 4 * window.max_cache_tokens
    assert max(held) == window.max_cache_tokens  # peaks just before a boundary, never above
    per_token = sizes[held.index(max(held))] // max(held)
    assert max(sizes) <= window.max_cache_tokens * per_token
    # Flat: the second half of the session holds no more than the first.
    assert max(sizes[len(sizes) // 2 :]) <= max(sizes[: len(sizes) // 2])
    assert result.usage.evicted_tokens == window.evicted(fed) > 0
    unbounded = tiny_engine.stream(ids, SamplingParams(max_new_tokens=120))
    unbounded.run()
    assert cache_bytes(unbounded.cache) > 4 * max(sizes)
    assert sorted(blocks) == list(range(fed // B))  # every block was cut before its eviction


def test_a_windowed_cache_rebuilt_from_blocks_continues_exactly(tiny_engine, tiny_prompts):
    window = CacheWindow(max_cache_tokens=68, sink_tokens=4, block_tokens=B)
    ids = tiny_prompts.encode(prompt=TEXT)[:150]
    first, blocks, _, _ = _run(tiny_engine, ids, window)
    for kept in (3, 37, 60):  # resume after `kept` output tokens, from the last boundary before
        sequence = ids + first.token_ids[:kept]
        boundary = (len(sequence) - 1) // B
        past = rebuild(blocks, boundary, window, tiny_engine.rerotator(), tiny_engine.model.config)
        assert past.get_seq_length() == boundary * B - window.evicted(boundary * B)
        resumed = tiny_engine.stream(
            ids, SamplingParams(max_new_tokens=80), past=past, past_tokens=boundary * B,
            prior_output=first.token_ids[:kept], window=window,
        ).run()  # fmt: skip
        assert resumed.token_ids == first.token_ids


def test_sink_and_window_modes_differ_and_a_short_sequence_is_untouched(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt=TEXT)[:30]
    params = SamplingParams(max_new_tokens=10)
    unbounded = tiny_engine.generate(ids, params)
    # 39 tokens never reach the first eviction of a 68-token window: same output as unbounded.
    window = CacheWindow(max_cache_tokens=68, sink_tokens=4, block_tokens=B)
    bounded = tiny_engine.generate(ids, params, window=window)
    assert bounded.token_ids == unbounded.token_ids
    assert bounded.usage.evicted_tokens == 0


def test_a_window_past_the_models_context_is_refused(tiny_engine):
    too_big = tiny_engine.loaded.max_context + B
    with pytest.raises(InvalidArgument, match="exceeds the model's context"):
        tiny_engine.generate(
            [1, 2, 3], SamplingParams(max_new_tokens=2), window=CacheWindow(too_big, 4, B)
        )


def test_a_windowed_past_must_stand_for_whole_blocks(tiny_engine):
    window = CacheWindow(max_cache_tokens=68, sink_tokens=4, block_tokens=B)
    with pytest.raises(InvalidArgument, match="whole number of blocks"):
        tiny_engine.stream(list(range(40)), SamplingParams(), past_tokens=20, window=window)
    with pytest.raises(InvalidArgument, match="needs use_cache"):
        tiny_engine.stream(list(range(40)), SamplingParams(), use_cache=False, window=window)
