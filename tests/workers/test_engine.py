import pytest
import torch
from transformers import DynamicCache

from workers.api import MAX_NEW_TOKENS_LIMIT, SamplingParams
from workers.engine import sample
from workers.models import cache_keyword

PROMPTS = [
    "The quick brown fox",
    "In a hole in the ground there lived",
    "KV caches store attention keys and values so that",
    "1, 2, 3, 4,",
    "Once upon a time",
    "def fibonacci(n):",
    "The capital of France is",
    "Redis is an in-memory data store used as",
]


def hf_greedy(loaded, prompt_ids, n, ignore_eos=False):
    out = loaded.model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        do_sample=False,
        min_new_tokens=n if ignore_eos else 0,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_identical_with_cache_without_cache_and_hf_generate(
    tiny, tiny_engine, prompt, tiny_prompts
):
    ids = tiny_prompts.encode(prompt=prompt)
    params = SamplingParams(max_new_tokens=24)
    tiny_engine.eos_token_ids = frozenset()  # compare full-length runs
    try:
        cached = tiny_engine.generate(ids, params)
        recomputed = tiny_engine.generate(ids, params, use_cache=False)
    finally:
        tiny_engine.eos_token_ids = tiny.eos_token_ids
    assert len(cached.token_ids) == 24
    assert cached.token_ids == recomputed.token_ids
    assert cached.token_ids == hf_greedy(tiny, ids, 24, ignore_eos=True)
    assert cached.text == recomputed.text


@pytest.mark.model
def test_smollm2_greedy_matches_without_cache_and_hf_generate(
    smollm2, smollm2_engine, smollm2_prompts
):
    ids = smollm2_prompts.encode(
        messages=[{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    )
    params = SamplingParams(max_new_tokens=16)
    cached = smollm2_engine.generate(ids, params)
    recomputed = smollm2_engine.generate(ids, params, use_cache=False)
    assert cached.token_ids == recomputed.token_ids
    assert cached.token_ids == hf_greedy(smollm2, ids, 16)
    assert "Paris" in cached.text
    # The instruct model ends its answer with <|im_end|>, which is its EOS.
    assert cached.finish_reason == "eos"
    assert cached.token_ids[-1] in smollm2.eos_token_ids
    assert "<|im_end|>" not in cached.text


def test_streamed_deltas_add_up_to_the_text(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="Once upon a time")
    generation = tiny_engine.stream(ids, SamplingParams(max_new_tokens=20))
    events = list(generation)
    assert len(events) == len(generation.result.token_ids)
    assert [e.token_id for e in events] == generation.result.token_ids
    assert "".join(e.text for e in events) == generation.result.text


def test_same_seed_same_sample_other_seed_other_sample(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="The quick brown fox")
    sample = {
        s: tiny_engine.generate(
            ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=100, seed=s)
        )
        for s in (1, 1, 2)
    }
    again = tiny_engine.generate(
        ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=100, seed=1)
    )
    assert sample[1].token_ids == again.token_ids
    assert sample[1].token_ids != sample[2].token_ids
    greedy = tiny_engine.generate(ids, SamplingParams(max_new_tokens=16))
    assert sample[1].token_ids != greedy.token_ids  # sampling really samples


def test_top_k_one_is_greedy(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="In a hole in the ground there lived")
    greedy = tiny_engine.generate(ids, SamplingParams(max_new_tokens=12))
    top1 = tiny_engine.generate(
        ids, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    )
    assert top1.token_ids == greedy.token_ids


def test_stop_string_ends_generation_and_is_never_streamed(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="Once upon a time")
    full = tiny_engine.generate(ids, SamplingParams(max_new_tokens=30))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    assert stop.strip()
    generation = tiny_engine.stream(ids, SamplingParams(max_new_tokens=30, stop=(stop,)))
    streamed = "".join(e.text for e in generation)
    result = generation.result
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)]
    assert streamed == result.text
    assert len(result.token_ids) < 30


def test_eos_ends_generation(tiny, tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="Once upon a time")
    full = tiny_engine.generate(ids, SamplingParams(max_new_tokens=20))
    eos = full.token_ids[5]
    first = full.token_ids.index(eos)
    tiny_engine.eos_token_ids = frozenset({eos})
    try:
        stopped = tiny_engine.generate(ids, SamplingParams(max_new_tokens=20))
    finally:
        tiny_engine.eos_token_ids = tiny.eos_token_ids
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == full.token_ids[: first + 1]


def test_ignore_eos_generates_past_the_end_of_text(tiny, tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="Once upon a time")
    full = tiny_engine.generate(ids, SamplingParams(max_new_tokens=20))
    tiny_engine.eos_token_ids = frozenset({full.token_ids[2]})
    try:
        on = tiny_engine.generate(ids, SamplingParams(max_new_tokens=20, ignore_eos=True))
    finally:
        tiny_engine.eos_token_ids = tiny.eos_token_ids
    assert on.finish_reason == "length" and on.token_ids == full.token_ids


def test_length_limit(tiny_engine, tiny_prompts):
    result = tiny_engine.generate(
        tiny_prompts.encode(prompt="Hello"), SamplingParams(max_new_tokens=7)
    )
    assert result.finish_reason in ("length", "eos")
    assert len(result.token_ids) <= 7


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_resume_from_prior_output_continues_identically(tiny_engine, temperature, tiny_prompts):
    ids = tiny_prompts.encode(prompt="KV caches store attention keys and values so that")
    params = SamplingParams(max_new_tokens=20, temperature=temperature, seed=11)
    whole = tiny_engine.generate(ids, params)
    resumed = tiny_engine.generate(ids, params, prior_output=whole.token_ids[:8])
    assert resumed.token_ids == whole.token_ids
    assert resumed.text == whole.text


def test_prefill_skips_the_cached_prefix(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="Redis is an in-memory data store used as a cache by")
    params = SamplingParams(max_new_tokens=12)
    reference = tiny_engine.stream(ids, params)
    reference.run()
    # A cache holding the first 8 tokens, as a worker would rebuild from stored blocks.
    keyword = cache_keyword(tiny_engine.model)
    past = DynamicCache(config=tiny_engine.model.config)
    tiny_engine.model(input_ids=torch.tensor([ids[:8]]), use_cache=True, **{keyword: past})
    resumed = tiny_engine.generate(ids, params, past=past)
    assert resumed.usage.cached_tokens == 8
    assert resumed.token_ids == reference.result.token_ids
    # A cache holding the whole prompt: the last token is recomputed for its logits.
    full = DynamicCache(config=tiny_engine.model.config)
    tiny_engine.model(input_ids=torch.tensor([ids]), use_cache=True, **{keyword: full})
    again = tiny_engine.generate(ids, params, past=full)
    assert again.usage.cached_tokens == len(ids) - 1
    assert again.token_ids == reference.result.token_ids


def test_live_cache_tracks_fed_tokens(tiny_engine, tiny_prompts):
    ids = tiny_prompts.encode(prompt="1, 2, 3, 4,")
    generation = tiny_engine.stream(ids, SamplingParams(max_new_tokens=5))
    for _ in generation:
        assert generation.cache.get_seq_length() == len(generation.fed_token_ids)
    assert generation.fed_token_ids == ids + generation.result.token_ids[:-1]


@pytest.mark.parametrize("n", [0, -1, MAX_NEW_TOKENS_LIMIT + 1])
def test_max_new_tokens_out_of_range(n):
    with pytest.raises(ValueError, match=f"between 1 and {MAX_NEW_TOKENS_LIMIT}"):
        SamplingParams(max_new_tokens=n)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(tiny, tiny_engine):
    too_long = [5] * tiny.max_context
    with pytest.raises(ValueError, match=f"exceeds the model's context of {tiny.max_context}"):
        tiny_engine.stream(too_long, SamplingParams(max_new_tokens=1))


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    # Probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two (0.5 alone falls short), never
    # the third; top_p 0.5 keeps the first alone.
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    wide = SamplingParams(temperature=1.0, top_p=0.6, seed=1)
    picks = {sample(logits, wide, position) for position in range(200)}
    assert picks == {1, 2}
    narrow = SamplingParams(temperature=1.0, top_p=0.5, seed=1)
    assert {sample(logits, narrow, position) for position in range(50)} == {1}
    every = SamplingParams(temperature=1.0, top_p=1.0, seed=1)
    assert {sample(logits, every, position) for position in range(200)} == {0, 1, 2}
