"""A sequence's block chain: the hashes of its full blocks, and cutting completed blocks out of a
live cache for the write-behind queue.

Under a window, a block computed after the first eviction depends on the window, so it is keyed in
a namespace that names the window; the blocks before stay in the plain namespace, shared with
every request on that prefix (workers.window).
"""

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from transformers import DynamicCache

from workers.engine import Generation
from workers.kv.bounds import CacheWindow
from workers.kv.hashing import BlockHash, Namespace, chain_hashes
from workers.kv.layout import LayerKV, cache_to_blocks, recent_blocks

# (hash, block [layers, 2, kv_heads, block_tokens, head_dim]) pairs, in chain order
Submit = Callable[[list[tuple[BlockHash, torch.Tensor]]], object]


class BlockChain:
    """The hashes of a growing sequence's full blocks, extended as the sequence grows."""

    def __init__(
        self,
        namespace: Namespace,
        window: CacheWindow | None,
        known: Sequence[BlockHash] = (),
    ) -> None:
        """`known`: the plain chain's first hashes, already computed (by the gateway) for the
        same namespace; the chain goes on from them."""
        self.window = window
        self._namespaces = [namespace]
        if window is not None:
            self._namespaces.append(
                replace(namespace, window=(window.max_cache_tokens, window.sink_tokens))
            )
        self._chains: list[list[BlockHash]] = [[] for _ in self._namespaces]
        self._chains[0].extend(known)
        self.block_tokens = namespace.block_tokens

    def hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        size = self.block_tokens
        full = len(tokens) // size
        for namespace, chain in zip(self._namespaces, self._chains, strict=True):
            if full > len(chain):
                parent = chain[-1] if chain else None
                fresh = tokens[len(chain) * size : full * size]
                chain.extend(chain_hashes(namespace, fresh, parent))
        plain = self._chains[0][:full]
        if self.window is None:
            return plain
        windowed = self._chains[1]
        return [windowed[i] if self.window.windowed_block(i) else plain[i] for i in range(full)]


def cut_blocks(generation: Generation, chain: BlockChain, written: int, submit: Submit) -> int:
    """Hand blocks completed since block `written` to `submit`; returns the new count."""
    if generation.cache is None:
        return written
    return _cut(
        generation.cache, generation.fed_token_ids, generation.chunk_tokens is not None, chain,
        written, submit,
    )  # fmt: skip


def _cut(
    cache: DynamicCache | Sequence[LayerKV],
    fed: Sequence[int],
    tail: bool,
    chain: BlockChain,
    written: int,
    submit: Submit,
) -> int:
    block_tokens = chain.block_tokens
    full = len(fed) // block_tokens
    if full <= written:
        return written
    hashes = chain.hashes(fed)
    # Fresh tensors (both functions copy), so the growing cache cannot change them.
    if not tail:
        blocks = cache_to_blocks(cache, block_tokens, first_block=written)
    else:  # a windowed or sliding cache: the new blocks are at its tail
        assert isinstance(cache, DynamicCache)
        blocks = recent_blocks(
            cache, full - written, block_tokens, after=len(fed) - full * block_tokens
        )
    submit(list(zip(hashes[written:full], blocks[: full - written], strict=True)))
    return full


class Cutter:
    """Cuts a generation's completed blocks for the writer; called after every chunk and token."""

    def __init__(self, chain: BlockChain, written: int, submit: Submit) -> None:
        self._chain, self.written, self._submit = chain, written, submit

    def __call__(self, generation: Generation) -> None:
        self.written = cut_blocks(generation, self._chain, self.written, self._submit)

    def due(self, fed_tokens: int) -> bool:
        """Whether a block completed since the last cut (cheap: no tensor is touched)."""
        return fed_tokens // self._chain.block_tokens > self.written

    def cut_row(self, layers: Sequence[LayerKV], fed: Sequence[int]) -> None:
        """Cut from one sequence's row of a batched cache (workers.batch_cache).

        `layers` are that row's (keys, values), each [1, kv_heads, tokens, head_dim] without its
        padding, holding exactly the tokens `fed`.
        """
        self.written = _cut(layers, fed, False, self._chain, self.written, self._submit)
