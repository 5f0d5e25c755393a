"""A bounded KV cache for long sessions: attention sinks plus a recent window (StreamingLLM).

A `CacheWindow` caps a session's cache at `max_cache_tokens`. The first `sink_tokens` tokens
(the "attention sinks", which soak up attention mass in every layer) always stay; the middle is
evicted; the most recent tokens stay. Positions are cache-relative, as in StreamingLLM: a token
sits at its slot in the cache, so no position ever passes `max_cache_tokens` and a session can run
past the model's context length.

Positions stay right by re-rotating keys. RoPE rotates a key by its position; when `e` tokens are
evicted, every later key moves down `e` slots, so it is rotated by `-e` (rotations compose, so
this is exact up to float rounding). We chose re-rotation over keeping unrotated keys because it
needs no change to the model's attention: transformers' own RoPE and masks run unmodified on a
plain `DynamicCache`, and the cached keys stay in the same form as every stored block.

The eviction schedule is a function of the token count only, so every worker computes the same
cache for the same tokens and a windowed session can be rebuilt anywhere:

- Tokens are fed in chunks that end on block boundaries (decode feeds one at a time).
- At each block boundary, if the cache holds more than `max_cache_tokens - block_tokens` tokens,
  the oldest non-sink tokens are evicted down to that. So the cache peaks at `max_cache_tokens`
  just before a boundary, and after `T` tokens (`T` on a boundary) exactly
  `evicted(T) = max(0, T - (max_cache_tokens - block_tokens))` tokens are gone.
- A block is cut for the store as soon as it completes, before the eviction at its boundary, so
  its keys are rotated for the slots it was computed at: `j * block_tokens - evicted(j * B)`
  onwards. Rebuilding the state at a boundary takes the sink tokens and the window's tokens from
  their blocks and rotates each block's keys once, from where it was computed to where it sits.

A block computed after the first eviction attended to a windowed cache, so its K and V depend on
the window; those blocks are stored under a namespace that names the window
(`Namespace.window`). Blocks before the first eviction are the same as in an unbounded session
and keep the plain namespace, so they are shared with every other request on that prefix.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvpool.errors import InvalidArgument
from workers.kv.bounds import CacheWindow

# Model families whose attention applies RoPE to the whole head with transformers' `rotate_half`
# convention, which is what `rotate_keys` inverts. Others are refused rather than mis-rotated.
ROTATE_HALF_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3"})
# RoPE variants whose frequencies do not depend on the sequence length.
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


def native_window(config) -> int | None:
    """A model's own sliding window, when some of its layers attend only to recent tokens."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def check_windowable(model) -> None:
    """Raise unless `model` is a RoPE model whose keys `rotate_keys` can re-rotate."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in ROTATE_HALF_MODEL_TYPES:
        raise InvalidArgument(
            f"max_cache_tokens needs a RoPE model of type {sorted(ROTATE_HALF_MODEL_TYPES)}; "
            f"this model is {config.model_type!r}"
        )
    if native_window(model.config) is not None:
        raise InvalidArgument(
            "this model has a native sliding window (config.sliding_window="
            f"{config.sliding_window}), which already bounds its cache; "
            "max_cache_tokens applies to full-attention models"
        )
    rotary = _rotary(model)
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise InvalidArgument(
            f"max_cache_tokens cannot re-rotate keys for RoPE type {rope_type!r}; "
            f"supported: {sorted(_STATIC_ROPE_TYPES)}"
        )


def _rotary(model) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
    raise InvalidArgument("max_cache_tokens needs a RoPE model; this model has no rotary embedding")


class Rerotator:
    """Rotates cached keys of one model by a number of positions."""

    def __init__(self, model) -> None:
        check_windowable(model)
        self._inv_freq = _rotary(model).inv_freq.detach().float()  # [head_dim / 2]

    def rotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """`keys` [..., tokens, head_dim] as if their positions had been `delta` further on."""
        if delta == 0:
            return keys
        inv_freq = self._inv_freq.to(keys.device)
        if 2 * inv_freq.numel() != keys.shape[-1]:
            raise InvalidArgument(
                f"keys have head_dim {keys.shape[-1]} but RoPE rotates {2 * inv_freq.numel()}; "
                "partial rotary models cannot be windowed"
            )
        angles = torch.cat([inv_freq, inv_freq]) * float(delta)  # [head_dim]
        cos, sin = angles.cos(), angles.sin()
        k = keys.float()
        half = k.shape[-1] // 2
        rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        return (k * cos + rotated_half * sin).to(keys.dtype)


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of every layer's keys and values."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def evict(cache: DynamicCache, window: CacheWindow, rerotator: Rerotator | None) -> int:
    """Evict down to `window.kept_tokens` if the cache holds more; returns tokens evicted.

    Called only at block boundaries. `rerotator` None leaves the kept keys' positions as they
    were (an ablation, never what a worker does).
    """
    held = cache.get_seq_length()
    excess = held - window.kept_tokens
    if excess <= 0:
        return 0
    sinks = window.sink_tokens
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise InvalidArgument(
                f"layer {index} is a {type(layer).__name__}; only DynamicLayers can be windowed"
            )
        keys, values = layer.keys, layer.values  # [batch, kv_heads, held, head_dim]
        recent_keys = keys[:, :, sinks + excess :]
        if rerotator is not None:
            recent_keys = rerotator.rotate(recent_keys, -excess)
        layer.keys = torch.cat([keys[:, :, :sinks], recent_keys], dim=2)
        layer.values = torch.cat([values[:, :, :sinks], values[:, :, sinks + excess :]], dim=2)
    return excess


def rebuild(
    blocks: dict[int, torch.Tensor],
    boundary_block: int,
    window: CacheWindow,
    rerotator: Rerotator,
    config=None,
) -> DynamicCache:
    """The windowed cache after `boundary_block` full blocks, from those blocks' stored K and V.

    `blocks` maps block index to [layers, 2, kv_heads, block_tokens, head_dim], holding at least
    `window.blocks_for_state(boundary_block)`. Each block's keys are as they were cut: rotated for
    the slots the block was computed at. They are rotated once to the slots they hold now.
    """
    from workers.kv.layout import blocks_to_cache

    size = window.block_tokens
    fed = boundary_block * size
    evicted = window.evicted(fed)
    needed = window.blocks_for_state(boundary_block)
    missing = [i for i in needed if i not in blocks]
    if missing:
        raise InvalidArgument(f"rebuilding the window needs blocks {missing}")
    if evicted == 0:
        return blocks_to_cache([blocks[i] for i in needed], config)
    pieces: list[torch.Tensor] = []
    for index in needed:
        block = blocks[index]  # [L, 2, H, T, D]
        start, stop = index * size, (index + 1) * size
        if start < window.sink_tokens:  # a sink block: its leading sink tokens never move
            pieces.append(block[:, :, :, : min(window.sink_tokens, stop) - start])
        keep_from = max(start, window.sink_tokens + evicted)
        if keep_from >= stop:
            continue
        kept = block[:, :, :, keep_from - start :]
        # Computed at slot (token - evicted(start)); now at slot (token - evicted).
        delta = window.evicted(start) - evicted
        keys = rerotator.rotate(kept[:, 0], delta)
        pieces.append(torch.stack([keys, kept[:, 1]], dim=1))
    return blocks_to_cache([torch.cat(pieces, dim=3)], config)
