"""Between vLLM's paged KV tensors and kvpool blocks: gather blocks out, scatter blocks in.

vLLM gives the connector one tensor per attention layer, laid out by its attention backend:

    CPU backend         [num_blocks, kv_heads, block_size, 2 * head_dim]  (K rows, then V rows)
    FlashAttention      [2, num_blocks, block_size, kv_heads, head_dim]

Both are viewed here as K and V of [num_blocks, kv_heads, block_size, head_dim] (no copy), so
one kvpool block of T tokens, which spans T / block_size vLLM blocks, is a gather of those
blocks' rows: [layers, 2, kv_heads, T, head_dim], kvpool's block shape. No vLLM import: the
mapping is unit-tested against plain tensors laid out as each backend lays them.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpool.errors import InvalidArgument


def _kv_views(cache: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer's paged cache, each [num_blocks, heads, block_size, head_dim]."""
    if cache.dim() == 4 and cache.shape[1] == heads and cache.shape[3] == 2 * head_dim:
        blocks, _, size, _ = cache.shape  # CPU backend: per block and head, K rows then V rows
        both = cache.view(blocks, heads, 2, size, head_dim)
        return both[:, :, 0], both[:, :, 1]
    if cache.dim() == 5 and cache.shape[0] == 2 and cache.shape[3:] == (heads, head_dim):
        return cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3)  # FlashAttention
    raise InvalidArgument(
        f"kvpool's vLLM connector reads [num_blocks, {heads}, block_size, {2 * head_dim}] (CPU) "
        f"or [2, num_blocks, block_size, {heads}, {head_dim}] (FlashAttention) KV caches; this "
        f"engine's attention backend gave {tuple(cache.shape)}"
    )


@dataclass
class PagedLayout:
    """The engine's K and V views, layer by layer, and the token counts that map them."""

    keys: list[torch.Tensor]  # per layer [num_blocks, H, N, D]
    values: list[torch.Tensor]
    engine_block: int  # N, vLLM's block size
    block_tokens: int  # T, kvpool's, a multiple of N

    @classmethod
    def of(
        cls, caches: Sequence[torch.Tensor], heads: int, head_dim: int, engine_block: int,
        block_tokens: int,
    ) -> "PagedLayout":  # fmt: skip
        if block_tokens % engine_block:
            raise InvalidArgument(
                f"block_tokens ({block_tokens}) must be a multiple of vLLM's block size "
                f"({engine_block})"
            )
        views = [_kv_views(c, heads, head_dim) for c in caches]
        for k, _ in views:
            if k.shape[2] != engine_block:
                raise InvalidArgument(
                    f"a KV cache of block size {k.shape[2]}, but vLLM said {engine_block}"
                )
        return cls([k for k, _ in views], [v for _, v in views], engine_block, block_tokens)

    @property
    def per_block(self) -> int:
        """vLLM blocks in one kvpool block."""
        return self.block_tokens // self.engine_block

    def gather(self, engine_blocks: Sequence[int]) -> torch.Tensor:
        """-> [n, layers, 2, H, T, D], a copy of the n kvpool blocks that `engine_blocks` (n
        times `per_block` vLLM block ids, in token order) hold."""
        n, m = len(engine_blocks) // self.per_block, self.per_block
        if n * m != len(engine_blocks) or n == 0:
            raise ValueError(f"{len(engine_blocks)} vLLM blocks are not whole kvpool blocks")
        index = torch.tensor(engine_blocks, device=self.keys[0].device)
        layers = []
        for k, v in zip(self.keys, self.values, strict=True):
            pair = torch.stack([k.index_select(0, index), v.index_select(0, index)])
            _, _, h, size, d = pair.shape  # [2, n*m, H, N, D] -> [n, 2, H, m*N, D]
            pair = pair.view(2, n, m, h, size, d).permute(1, 0, 3, 2, 4, 5)
            layers.append(pair.reshape(n, 2, h, m * size, d))
        return torch.stack(layers, dim=1)  # [n, L, 2, H, T, D]

    def scatter(self, block: torch.Tensor, engine_blocks: Sequence[int], skip: int = 0) -> None:
        """Write one kvpool block ([layers, 2, H, T, D]) into the `per_block` vLLM blocks that
        hold its tokens, leaving its first `skip` tokens' blocks (already computed by vLLM,
        perhaps shared with other requests) untouched. `skip` is a multiple of vLLM's block."""
        if skip % self.engine_block or not 0 <= skip < self.block_tokens:
            raise ValueError(f"skip {skip} is not a vLLM block boundary inside the block")
        first = skip // self.engine_block
        index = torch.tensor(engine_blocks[first:], device=self.keys[0].device)
        size = self.engine_block
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            for kv, target in ((0, k), (1, v)):
                src = block[layer, kv, :, skip:]  # [H, rest, D]
                h, _, d = src.shape
                src = src.reshape(h, -1, size, d).permute(1, 0, 2, 3)  # [blocks, H, N, D]
                target.index_copy_(0, index, src.to(target.dtype))
