"""DynamicCache <-> blocks, and continuing generation from stored blocks."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvpool.errors import InvalidArgument
from workers.kv.block import decode_block, encode_block
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import Namespace, chain_hashes
from workers.kv.layout import blocks_to_cache, cache_to_blocks
from workers.models import cache_keyword, returned_cache

BLOCK = 16


def random_cache(
    layers: int = 3, heads: int = 2, tokens: int = 40, head_dim: int = 8
) -> DynamicCache:
    torch.manual_seed(1)
    cache = DynamicCache()
    for index in range(layers):
        cache.update(
            torch.randn(1, heads, tokens, head_dim), torch.randn(1, heads, tokens, head_dim), index
        )
    return cache


def test_blocks_are_the_cache_cut_along_tokens() -> None:
    cache = random_cache(tokens=40)
    blocks = cache_to_blocks(cache, BLOCK)
    assert len(blocks) == 2  # 40 tokens: two full blocks, the 8-token tail is not a block
    for number, block in enumerate(blocks):
        assert block.shape == (3, 2, 2, BLOCK, 8)
        tokens = slice(number * BLOCK, (number + 1) * BLOCK)
        for layer in range(3):
            assert torch.equal(block[layer, 0], cache.layers[layer].keys[0, :, tokens])
            assert torch.equal(block[layer, 1], cache.layers[layer].values[0, :, tokens])
    blocks[0].zero_()  # blocks own their memory
    assert cache.layers[0].keys.abs().sum() > 0


def test_first_block_skips_blocks_already_stored() -> None:
    cache = random_cache(tokens=50)
    everything = cache_to_blocks(cache, BLOCK)
    assert len(everything) == 3
    later = cache_to_blocks(cache, BLOCK, first_block=2)
    assert len(later) == 1 and torch.equal(later[0], everything[2])
    assert cache_to_blocks(cache, BLOCK, first_block=3) == []


def test_cache_from_layer_tensors() -> None:
    cache = random_cache()
    pairs = [(layer.keys, layer.values) for layer in cache.layers]
    assert all(
        torch.equal(a, b)
        for a, b in zip(cache_to_blocks(pairs, BLOCK), cache_to_blocks(cache, BLOCK), strict=True)
    )


def test_blocks_to_cache_round_trip() -> None:
    cache = random_cache(tokens=48)
    rebuilt = blocks_to_cache(cache_to_blocks(cache, BLOCK))
    assert rebuilt.get_seq_length() == 48
    for original, layer in zip(cache.layers, rebuilt.layers, strict=True):
        assert torch.equal(original.keys, layer.keys)
        assert torch.equal(original.values, layer.values)
    assert blocks_to_cache([]).get_seq_length() == 0


def test_caller_mistakes() -> None:
    batch2 = DynamicCache()
    batch2.update(torch.zeros(2, 1, 16, 4), torch.zeros(2, 1, 16, 4), 0)
    with pytest.raises(InvalidArgument, match="batch size 1"):
        cache_to_blocks(batch2, BLOCK)
    with pytest.raises(InvalidArgument):
        cache_to_blocks(random_cache(), 0)
    with pytest.raises(InvalidArgument):
        cache_to_blocks(random_cache(), BLOCK, first_block=-1)
    with pytest.raises(InvalidArgument):
        blocks_to_cache([torch.zeros(2, 2, 1, 16, 4), torch.zeros(3, 2, 1, 16, 4)])


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


@torch.no_grad()
def continue_greedy(
    model: LlamaForCausalLM, cache: DynamicCache, tail: torch.Tensor, steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill `tail` ([1, n]) after `cache`, then decode greedily: tokens and every logits row."""
    cached = {cache_keyword(model): cache}
    logits = model(tail, use_cache=True, **cached).logits[:, -1]  # [1, vocab]
    tokens, rows = [], [logits]
    for _ in range(steps):
        token = logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        tokens.append(int(token))
        logits = model(token, use_cache=True, **cached).logits[:, -1]
        rows.append(logits)
    return tokens, rows


@pytest.mark.parametrize(("codec", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@torch.no_grad()
def test_continuing_from_stored_blocks_matches_the_uninterrupted_cache(
    codec: str, dtype: torch.dtype
) -> None:
    """Raw codecs in the model's own dtype are bit-exact, so the continuation is identical.

    The tiny model runs in float16/bfloat16 so that fp16/bf16 blocks are lossless for it (with a
    float32 model they are lossy by design; `kvpool bench codec` measures that). Both runs prefill
    the 6 full blocks (96 tokens) the same way; one continues from that cache, the other from
    the same blocks after encode -> bytes -> decode -> blocks_to_cache. The 4-token tail and 24
    greedy steps then run identically, so tokens and logits must match exactly.
    """
    model = tiny_llama(dtype)
    torch.manual_seed(2)
    prompt = torch.randint(0, 256, (1, 100))
    cached = 6 * BLOCK
    prefix = returned_cache(model(prompt[:, :cached], use_cache=True))

    geometry = KVGeometry(
        num_layers=2, num_kv_heads=2, head_dim=16, dtype=str(dtype).removeprefix("torch.")
    )
    namespace = Namespace("tiny-llama-test", codec, block_tokens=BLOCK)
    hashes = chain_hashes(namespace, prompt[0].tolist())
    blocks = cache_to_blocks(prefix, BLOCK)
    assert len(blocks) == len(hashes) == 6
    values = [encode_block(b, codec, h) for b, h in zip(blocks, hashes, strict=True)]
    decoded = [
        decode_block(v, expected_hash=h, geometry=geometry, block_tokens=BLOCK)
        for v, h in zip(values, hashes, strict=True)
    ]
    restored = blocks_to_cache(decoded, model.config)
    assert restored.get_seq_length() == cached

    expected_tokens, expected_logits = continue_greedy(model, prefix, prompt[:, cached:], 24)
    tokens, logits = continue_greedy(model, restored, prompt[:, cached:], 24)
    assert tokens == expected_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))
    assert len(set(tokens)) > 1  # a degenerate model repeating one token would prove little


@torch.no_grad()
def test_blocks_cut_during_decode_line_up_with_a_fresh_prefill() -> None:
    """Write-behind cuts each newly full block with first_block; those blocks must equal the ones
    a single prefill of the same tokens produces (float32, up to matmul rounding)."""
    model = tiny_llama(torch.float32)
    torch.manual_seed(3)
    prompt = torch.randint(0, 256, (1, 20))
    output = model(prompt, use_cache=True)
    cache = returned_cache(output)
    stored = cache_to_blocks(cache, BLOCK)  # block 0
    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    generated = [prompt]
    while cache.get_seq_length() < 2 * BLOCK:
        generated.append(token)
        token = (
            model(token, use_cache=True, **{cache_keyword(model): cache})
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )
    stored += cache_to_blocks(cache, BLOCK, first_block=len(stored))  # block 1
    fresh = cache_to_blocks(
        returned_cache(model(torch.cat(generated, dim=1), use_cache=True)), BLOCK
    )
    assert len(stored) == len(fresh) == 2
    for a, b in zip(stored, fresh, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
