"""The longest cached prefix of a prompt, across L1 (this worker), L2 (the node tier) and L3
(the KVStore).

A prompt's full blocks have chain hashes h_1..h_n. L1 answers for a leading run h_1..h_k; the
node tier for a run after it (one actor call returning object refs); one `lookup` over the keys
of the rest tells how many more the store holds; one `get_many` fetches them (workers.fetch).
A block that fails verification ends the prefix there: it is deleted from its tier and counted,
and it never reaches the model. Any tier error is a shorter prefix, never a failed request.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvpool.errors import DataLoss
from workers.fetch import Decoded, fetch_run, locate
from workers.kv.hashing import BlockHash, block_key
from workers.node_tier import NodeTier
from workers.plan import Estimates
from workers.tiers import BlockStore, LocalBlocks

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    blocks: tuple[torch.Tensor, ...]  # each [layers, 2, kv_heads, block_tokens, head_dim]
    local_blocks: int  # leading blocks found in L1
    store_blocks: int  # blocks after those (and the node tier's), fetched from the store
    corrupt_blocks: int = 0  # cached values refused by verification (deleted)
    store_error: bool = False  # a tier could not be reached; the prefix may be short
    node_blocks: int = 0  # blocks after L1's, read from the node tier

    def __post_init__(self) -> None:
        if self.local_blocks + self.node_blocks + self.store_blocks != len(self.blocks):
            raise ValueError(
                "local_blocks + node_blocks + store_blocks must equal the number of blocks"
            )


def find_prefix(
    hashes: Sequence[BlockHash],
    local: LocalBlocks,
    store: BlockStore | None,
    decode: Callable[[bytes, BlockHash], torch.Tensor],
    node: NodeTier | None = None,
    estimates: Estimates | None = None,
) -> CachedPrefix:
    """The cached blocks of the longest prefix of `hashes`: L1, then the node tier, then the store.

    Blocks fetched from the node tier or the store are added to L1: this worker now holds them.
    """
    found = locate(hashes, local, node, store, estimates)
    decoded = Decoded(decode, local)
    fetched = fetch_run(found, hashes, len(found.local), node, store, decoded, estimates)
    return CachedPrefix(
        tuple(found.local + decoded.blocks),
        local_blocks=len(found.local),
        store_blocks=fetched.store_blocks,
        corrupt_blocks=fetched.corrupt_blocks,
        store_error=found.store_error or fetched.store_error,
        node_blocks=fetched.node_blocks,
    )


def find_blocks(
    hashes: dict[int, BlockHash],
    local: LocalBlocks,
    store: BlockStore | None,
    decode: Callable[[bytes, BlockHash], torch.Tensor],
    node: NodeTier | None = None,
) -> "CachedBlocks":
    """The blocks of `hashes` (block index -> hash) found in L1, the node tier or the store, not
    only a prefix.

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
    corrupt = 0
    if rest and node is not None:
        try:
            refs = node.refs([block_key(h) for h in rest.values()], leading=False)
            held = [(i, ref) for i, ref in zip(rest, refs, strict=True) if ref is not None]
            values = node.read([ref for _, ref in held])
        except Exception as exc:  # the tier's actor is gone or slow: try the store
            log.warning("node tier read failed, treating as a miss: %s", exc)
            held, values = [], []
        for (index, _), data in zip(held, values, strict=True):
            try:
                block = decode(data, rest[index])
            except DataLoss as exc:
                corrupt += 1
                log.warning("refusing node tier block %s: %s", block_key(rest[index]), exc)
                _forget(node, block_key(rest[index]))
                continue
            local.put(rest[index], block)
            found[index] = block
        rest = {i: h for i, h in rest.items() if i not in found}
    if not rest or store is None:
        return CachedBlocks(found, local_count, corrupt_blocks=corrupt)
    keys = {i: block_key(h) for i, h in rest.items()}
    try:
        values = store.get_many(list(keys.values()))
    except Exception as exc:  # store down or slow: compute instead
        log.warning("store get failed, treating as a miss: %s", exc)
        return CachedBlocks(found, local_count, corrupt, store_error=True)
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


def _forget(store: BlockStore | NodeTier, key: str) -> None:
    try:
        store.delete([key])
    except Exception as exc:  # deleting is hygiene; the next reader verifies again anyway
        log.warning("could not delete refused block %s: %s", key, exc)
