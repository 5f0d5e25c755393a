"""The longest cached prefix of a prompt, across L1 (this worker) and L2 (the KVStore).

A prompt's full blocks have chain hashes h_1..h_n. L1 answers for a leading run h_1..h_k; one
`lookup` over the keys of h_{k+1}..h_n tells how many more the store holds; one `get_many`
fetches them. A block that fails verification ends the prefix there: it is deleted from the store
and counted, and it never reaches the model. Any store error is a shorter prefix, never a failed
request.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvpool.errors import DataLoss
from workers.kv.hashing import BlockHash, block_key
from workers.tiers import BlockStore, LocalBlocks

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    blocks: tuple[torch.Tensor, ...]  # each [layers, 2, kv_heads, block_tokens, head_dim]
    local_blocks: int  # leading blocks found in L1
    store_blocks: int  # blocks after those, fetched from the store
    corrupt_blocks: int = 0  # store values refused by verification (deleted)
    store_error: bool = False  # the store could not be reached; the prefix may be short

    def __post_init__(self) -> None:
        if self.local_blocks + self.store_blocks != len(self.blocks):
            raise ValueError("local_blocks + store_blocks must equal the number of blocks")


def find_prefix(
    hashes: Sequence[BlockHash],
    local: LocalBlocks,
    store: BlockStore | None,
    decode: Callable[[bytes, BlockHash], torch.Tensor],
) -> CachedPrefix:
    """The cached blocks of the longest prefix of `hashes`, L1 first, then the store.

    Blocks fetched from the store are added to L1: this worker now holds them.
    """
    blocks = local.prefix(hashes)
    local_count = len(blocks)
    rest = list(hashes[local_count:])
    if not rest or store is None:
        return CachedPrefix(tuple(blocks), local_count, 0)
    keys = [block_key(h) for h in rest]
    corrupt = 0
    try:
        present = store.lookup(keys)
        values = store.get_many(keys[:present]) if present else {}
    except Exception as exc:  # store down or slow: compute instead
        log.warning("store lookup/get failed, treating as a miss: %s", exc)
        return CachedPrefix(tuple(blocks), local_count, 0, store_error=True)
    for block_hash, key in zip(rest[:present], keys[:present], strict=True):
        data = values.get(key)
        if data is None:  # evicted between lookup and get
            break
        try:
            block = decode(data, block_hash)
        except DataLoss as exc:
            corrupt += 1
            log.warning("refusing stored block %s: %s", key, exc)
            _forget(store, key)
            break
        local.put(block_hash, block)
        blocks.append(block)
    return CachedPrefix(tuple(blocks), local_count, len(blocks) - local_count, corrupt)


def find_blocks(
    hashes: dict[int, BlockHash],
    local: LocalBlocks,
    store: BlockStore | None,
    decode: Callable[[bytes, BlockHash], torch.Tensor],
) -> "CachedBlocks":
    """The blocks of `hashes` (block index -> hash) found in L1 or the store, not only a prefix.

    A windowed session needs its sink blocks and its most recent blocks, not the middle. Refused
    store values are deleted and counted, as in `find_prefix`; any store error is a partial find.
    """
    found: dict[int, torch.Tensor] = {}
    for index, block_hash in hashes.items():
        block = local.get(block_hash)
        if block is not None:
            found[index] = block
    local_count = len(found)
    rest = {i: h for i, h in hashes.items() if i not in found}
    if not rest or store is None:
        return CachedBlocks(found, local_count)
    keys = {i: block_key(h) for i, h in rest.items()}
    try:
        values = store.get_many(list(keys.values()))
    except Exception as exc:  # store down or slow: compute instead
        log.warning("store get failed, treating as a miss: %s", exc)
        return CachedBlocks(found, local_count, store_error=True)
    corrupt = 0
    for index, key in keys.items():
        data = values.get(key)
        if data is None:
            continue
        try:
            block = decode(data, rest[index])
        except DataLoss as exc:
            corrupt += 1
            log.warning("refusing stored block %s: %s", key, exc)
            _forget(store, key)
            continue
        local.put(rest[index], block)
        found[index] = block
    return CachedBlocks(found, local_count, corrupt_blocks=corrupt)


@dataclass(frozen=True, slots=True)
class CachedBlocks:
    blocks: dict[int, torch.Tensor]  # block index -> [layers, 2, kv_heads, block_tokens, head_dim]
    local_blocks: int  # of those, found in L1
    corrupt_blocks: int = 0
    store_error: bool = False


def _forget(store: BlockStore, key: str) -> None:
    try:
        store.delete([key])
    except Exception as exc:  # deleting is hygiene; the next reader verifies again anyway
        log.warning("could not delete refused block %s: %s", key, exc)
