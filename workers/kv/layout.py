"""Between a transformers `DynamicCache` and the run of blocks the store keeps.

A block is all layers' K and V for `block_tokens` consecutive tokens,
[layers, 2, kv_heads, block_tokens, head_dim]. Caches are read through `layers[i].keys/.values`
and rebuilt through the public `DynamicCache(config=...)` and `update()` (or, for plain layers,
by adopting tensors as they are: `cache_from_layers`), so the rebuilt cache is exactly what a
prefill of those tokens would have left, and generation continues after it.
Only batch size 1 is supported. `cache_to_blocks` takes full-attention layers only: a
sliding-window layer does not keep every token. Such layers are cut with `recent_blocks`, one
block as it completes, and `blocks_to_cache` fills them through `update()`, which keeps the tail.
"""

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpool.errors import InvalidArgument

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [batch, kv_heads, tokens, head_dim]


def _layer_tensors(cache: DynamicCache | Sequence[LayerKV]) -> list[LayerKV]:
    """The (keys, values) of every layer, from a DynamicCache or from a list of pairs."""
    if isinstance(cache, DynamicCache):
        pairs = []
        for index, layer in enumerate(cache.layers):
            # Exactly DynamicLayer: its subclasses (sliding window, quantized) drop or alter tokens.
            if type(layer) is not DynamicLayer:
                raise InvalidArgument(
                    f"layer {index} is a {type(layer).__name__}; only full-attention "
                    "DynamicLayer caches can be cut into prefix blocks"
                )
            if layer.keys is None or layer.values is None:
                raise InvalidArgument(f"layer {index} of the cache is empty")
            pairs.append((layer.keys, layer.values))
        return pairs
    return [(keys, values) for keys, values in cache]


def cache_to_blocks(
    cache: DynamicCache | Sequence[LayerKV], block_tokens: int, first_block: int = 0
) -> list[torch.Tensor]:
    """Full blocks from index first_block on, each [layers, 2, kv_heads, block_tokens, head_dim].

    The partial tail block is left out (it is never stored). Blocks are fresh tensors on the
    cache's device in its dtype, so the cache may keep growing while they are encoded.
    """
    if type(block_tokens) is not int or block_tokens <= 0:
        raise InvalidArgument(f"block_tokens must be a positive int, got {block_tokens!r}")
    if type(first_block) is not int or first_block < 0:
        raise InvalidArgument(f"first_block must be an int >= 0, got {first_block!r}")
    pairs = _layer_tensors(cache)
    if not pairs:
        return []
    shape = pairs[0][0].shape
    for keys, values in pairs:
        if keys.dim() != 4 or keys.shape != shape or values.shape != shape:
            raise InvalidArgument(
                "every layer's keys and values must be [1, kv_heads, tokens, head_dim] of one "
                f"shape; got {tuple(keys.shape)} and {tuple(values.shape)}, "
                f"first layer {tuple(shape)}"
            )
    if shape[0] != 1:
        raise InvalidArgument(f"only batch size 1 can be cut into blocks, got {shape[0]}")
    full = shape[2] // block_tokens
    if first_block >= full:
        return []
    start, stop = first_block * block_tokens, full * block_tokens
    kv = torch.stack(
        [torch.stack([k[0, :, start:stop], v[0, :, start:stop]]) for k, v in pairs]
    )  # [L, 2, H, n * T, D]
    layers, _, heads, _, head_dim = kv.shape
    kv = kv.view(layers, 2, heads, full - first_block, block_tokens, head_dim)  # [L, 2, H, n, T, D]
    # [n, L, 2, H, T, D] -> n blocks, each made contiguous so it owns its memory.
    return [block.contiguous() for block in kv.permute(3, 0, 1, 2, 4, 5).unbind(0)]


def blocks_to_cache(blocks: Sequence[torch.Tensor], config: Any = None) -> DynamicCache:
    """A DynamicCache holding `blocks` in order, ready for prefill to continue after them.

    blocks: each [layers, 2, kv_heads, tokens, head_dim], all alike but for tokens. `config` is
    the model's config (passed to `DynamicCache(config=...)` so layers match the model); with
    none, layers are created as plain DynamicLayers. An empty run gives an empty cache.
    """
    cache = DynamicCache(config=config)
    if not blocks:
        return cache
    first = blocks[0]
    for block in blocks:
        if (
            not isinstance(block, torch.Tensor)
            or block.dim() != 5
            or block.shape[1] != 2
            or block.shape[:3] != first.shape[:3]
            or block.shape[4] != first.shape[4]
            or block.dtype != first.dtype
            or block.device != first.device
        ):
            raise InvalidArgument(
                "blocks must all be [layers, 2, kv_heads, tokens, head_dim] with one layers, "
                "kv_heads, head_dim, dtype and device"
            )
    if config is not None:
        layers = config.get_text_config(decoder=True).num_hidden_layers
        if layers != first.shape[0]:
            raise InvalidArgument(f"blocks have {first.shape[0]} layers, the model has {layers}")
    kv = torch.cat(list(blocks), dim=3)  # [L, 2, H, S, D]
    for index in range(kv.shape[0]):
        # update() appends a copy: [1, H, S, D] keys and values for this layer.
        cache.update(kv[index, 0].unsqueeze(0), kv[index, 1].unsqueeze(0), index)
    return cache


def cache_from_layers(layers: Sequence[LayerKV], config: Any = None) -> DynamicCache:
    """A DynamicCache whose layers ARE the given (keys, values) tensors, each [1, H, S, D].

    Unlike `update()`, which concatenates onto an empty tensor (a copy), the tensors are adopted
    as they are; the next forward pass appends to them by concatenation, so they are never
    written in place. Plain layers only: a sliding-window layer keeps its own bookkeeping, so
    such a cache is filled through `update()` instead.
    """
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        layer = cache.layers[index] if index < len(cache.layers) else None
        if isinstance(layer, DynamicLayer) and type(layer) is DynamicLayer:
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            cache.update(keys, values, index)
    return cache


def recent_blocks(
    cache: DynamicCache, count: int, block_tokens: int, after: int = 0
) -> list[torch.Tensor]:
    """The `count` full blocks that end `after` tokens before the end of every layer.

    For caches that do not hold every token from the start: a windowed cache (sinks plus recent
    tokens) or a model's native sliding-window layers. The worker cuts each block as soon as it
    completes, so it is still at the tail. Blocks are fresh tensors, as from `cache_to_blocks`.
    """
    if count <= 0:
        return []
    span = count * block_tokens
    pairs = []
    for index, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() != 4 or keys.shape[0] != 1:
            raise InvalidArgument(f"layer {index} of the cache is empty or not batch size 1")
        held = keys.shape[2]
        if held < span + after:
            raise InvalidArgument(
                f"layer {index} holds {held} tokens, fewer than the {span + after} needed to cut "
                f"{count} blocks; its window is smaller than a block"
            )
        stop = held - after
        pairs.append((keys[:, :, stop - span : stop], values[:, :, stop - span : stop]))
    return cache_to_blocks(pairs, block_tokens)
