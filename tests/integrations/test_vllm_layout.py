"""The mapping between vLLM's paged KV tensors and kvpool blocks, on plain tensors laid out as
vLLM's CPU and FlashAttention backends lay them (the evidence that the connector works is
tests/integrations/test_vllm_connector.py, on real vLLM engines)."""

import pytest
import torch

from kvpool.errors import InvalidArgument
from kvpool.integrations.vllm_layout import PagedLayout

LAYERS, HEADS, HEAD_DIM, ENGINE_BLOCK, BLOCKS = 3, 2, 4, 8, 10


def _cpu_caches() -> list[torch.Tensor]:
    return [torch.randn(BLOCKS, HEADS, ENGINE_BLOCK, 2 * HEAD_DIM) for _ in range(LAYERS)]


def _cpu_k_v(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as vLLM's CPU attention reads them (cpu_attn.py: view, then chunk at dim 2)."""
    key, value = cache.view(BLOCKS, HEADS, 2 * ENGINE_BLOCK, HEAD_DIM).chunk(2, dim=2)
    return key, value


@pytest.mark.parametrize("block_tokens", [8, 16])
def test_a_gathered_block_is_its_tokens_k_and_v_in_kvpool_order(block_tokens):
    caches = _cpu_caches()
    layout = PagedLayout.of(caches, HEADS, HEAD_DIM, ENGINE_BLOCK, block_tokens)
    engine_blocks = [7, 2, 5, 0][: 2 * layout.per_block]  # two kvpool blocks, scattered pages
    blocks = layout.gather(engine_blocks)
    assert blocks.shape == (2, LAYERS, 2, HEADS, block_tokens, HEAD_DIM)
    for b in range(2):
        for t in range(block_tokens):
            page = engine_blocks[b * layout.per_block + t // ENGINE_BLOCK]
            for layer, cache in enumerate(caches):
                key, value = _cpu_k_v(cache)
                assert torch.equal(blocks[b, layer, 0, :, t], key[page, :, t % ENGINE_BLOCK])
                assert torch.equal(blocks[b, layer, 1, :, t], value[page, :, t % ENGINE_BLOCK])


@pytest.mark.parametrize("skip", [0, 8])
def test_scatter_writes_a_block_back_and_leaves_skipped_and_other_pages_alone(skip):
    source = _cpu_caches()
    blocks = PagedLayout.of(source, HEADS, HEAD_DIM, ENGINE_BLOCK, 16).gather([3, 9])
    target = [torch.zeros_like(c) for c in source]
    layout = PagedLayout.of(target, HEADS, HEAD_DIM, ENGINE_BLOCK, 16)
    layout.scatter(blocks[0], [4, 1], skip=skip)
    for layer in range(LAYERS):
        src_k, src_v = _cpu_k_v(source[layer])
        dst_k, dst_v = _cpu_k_v(target[layer])
        assert torch.equal(dst_k[1], src_k[9]) and torch.equal(dst_v[1], src_v[9])
        written_first = skip == 0
        assert torch.equal(dst_k[4], src_k[3]) == written_first
        others = [i for i in range(BLOCKS) if i not in (1, 4)]
        assert not target[layer][others].any()


def test_flash_attention_layout_maps_the_same_tokens():
    cpu = _cpu_caches()
    flash = []
    for cache in cpu:  # the same K and V as [2, blocks, block_size, heads, head_dim]
        key, value = _cpu_k_v(cache)
        flash.append(torch.stack([key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3)]).contiguous())
    a = PagedLayout.of(cpu, HEADS, HEAD_DIM, ENGINE_BLOCK, 16).gather([6, 2])
    b = PagedLayout.of(flash, HEADS, HEAD_DIM, ENGINE_BLOCK, 16).gather([6, 2])
    assert torch.equal(a, b)


def test_unknown_layouts_and_block_sizes_are_refused_with_what_is_supported():
    with pytest.raises(InvalidArgument, match="multiple of vLLM's block size"):
        PagedLayout.of(_cpu_caches(), HEADS, HEAD_DIM, ENGINE_BLOCK, 12)
    with pytest.raises(InvalidArgument, match="FlashAttention"):
        PagedLayout.of([torch.zeros(BLOCKS, 5, 7)], HEADS, HEAD_DIM, ENGINE_BLOCK, 16)
