"""Finding and fetching a prompt's cached prefix across L1, the node tier and the store.

`locate` asks each tier, in order, how far the prefix goes, without moving any block: L1 answers
from memory, the node tier with one actor call that returns object refs, the store with one
`Lookup` RPC. The fetch plan (workers.plan) then decides what to fetch; `fetch_run` fetches a
run of blocks (node tier first, then the store) and `split_prefix` recomputes the first blocks on
the device while a thread fetches the later ones, then joins them into one cache.

A block that fails verification ends the prefix there: it is deleted from its tier and counted,
and it never reaches the model. Any tier error is a shorter prefix, never a failed request.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from kvpool.errors import DataLoss
from workers.kv.hashing import BlockHash, block_key
from workers.kv.layout import blocks_to_cache
from workers.node_tier import NodeTier
from workers.plan import Estimates
from workers.tiers import BlockStore, LocalBlocks

log = logging.getLogger(__name__)

Decode = Callable[[Any, BlockHash], torch.Tensor]  # encoded value -> [L, 2, H, T, D]


@dataclass(slots=True)
class Located:
    """Where the prefix of a chain of hashes is cached; nothing fetched yet but L1's blocks."""

    local: list[torch.Tensor]  # L1's leading run, each [layers, 2, kv_heads, block_tokens, dim]
    node_refs: list[Any] = field(default_factory=list)  # the node tier's run after L1
    store_blocks: int = 0  # the store's run after those
    store_error: bool = False  # a tier could not be reached: the prefix may be short

    @property
    def cached_blocks(self) -> int:
        return len(self.local) + len(self.node_refs) + self.store_blocks


@dataclass(slots=True)
class Fetched:
    blocks: list[torch.Tensor]  # the run fetched, in order, each [L, 2, H, T, D]
    node_blocks: int = 0
    store_blocks: int = 0
    corrupt_blocks: int = 0
    store_error: bool = False


def locate(
    hashes: Sequence[BlockHash],
    local: LocalBlocks,
    node: NodeTier | None,
    store: BlockStore | None,
    estimates: Estimates | None = None,
) -> Located:
    found = Located(local.prefix(hashes))
    rest = [block_key(h) for h in hashes[len(found.local) :]]
    if rest and node is not None:
        started = time.perf_counter()
        try:
            found.node_refs = node.refs(rest)
        except Exception as exc:  # the tier's actor is gone or slow: go on without it
            log.warning("node tier lookup failed, treating as a miss: %s", exc)
            found.store_error = True
        if estimates is not None:
            estimates.observe_latency("node", time.perf_counter() - started)
        rest = rest[len(found.node_refs) :]
    if rest and store is not None:
        started = time.perf_counter()
        try:
            found.store_blocks = store.lookup(rest)
        except Exception as exc:  # store down or slow: compute instead
            log.warning("store lookup failed, treating as a miss: %s", exc)
            found.store_error = True
        if estimates is not None:
            estimates.observe_latency("store", time.perf_counter() - started)
    return found


def fetch_run(
    found: Located,
    hashes: Sequence[BlockHash],
    start: int,
    node: NodeTier | None,
    store: BlockStore | None,
    decode: Decode,
    local: LocalBlocks,
    estimates: Estimates | None = None,
) -> Fetched:
    """Fetch and decode blocks [start, found.cached_blocks) (start >= L1's run); add them to L1."""
    out = Fetched([])
    node_start = len(found.local)
    node_end = node_start + len(found.node_refs)
    first = max(start, node_start)
    if first < node_end and node is not None:
        started = time.perf_counter()
        nbytes = 0
        try:
            values = node.read(found.node_refs[first - node_start :])
        except Exception as exc:  # owner gone or object lost: a shorter prefix
            log.warning("node tier read failed, treating as a miss: %s", exc)
            out.store_error = True
            return out
        for index, value in enumerate(values, start=first):
            block = _verified(value, hashes[index], decode, node, out)
            if block is None:
                return out
            nbytes += len(value)
            local.put(hashes[index], block)
            out.blocks.append(block)
            out.node_blocks += 1
        if estimates is not None:
            estimates.observe_fetch("node", nbytes, time.perf_counter() - started)
    first = max(start, node_end)
    end = found.cached_blocks
    if first < end and store is not None:
        keys = [block_key(h) for h in hashes[first:end]]
        started = time.perf_counter()
        try:
            stored = store.get_many(keys)
        except Exception as exc:  # store down or slow: compute instead
            log.warning("store get failed, treating as a miss: %s", exc)
            out.store_error = True
            return out
        nbytes = 0
        for index, key in enumerate(keys, start=first):
            data = stored.get(key)
            if data is None:  # evicted between lookup and get
                break
            block = _verified(data, hashes[index], decode, store, out)
            if block is None:
                break
            nbytes += len(data)
            local.put(hashes[index], block)
            out.blocks.append(block)
            out.store_blocks += 1
        if estimates is not None:
            estimates.observe_fetch("store", nbytes, time.perf_counter() - started)
    return out


def _verified(
    data: Any, block_hash: BlockHash, decode: Decode, tier: Any, out: Fetched
) -> torch.Tensor | None:
    try:
        return decode(data, block_hash)
    except DataLoss as exc:
        key = block_key(block_hash)
        out.corrupt_blocks += 1
        log.warning("refusing cached block %s: %s", key, exc)
        try:
            tier.delete([key])
        except Exception as delete_exc:  # hygiene; the next reader verifies again anyway
            log.warning("could not delete refused block %s: %s", key, delete_exc)
        return None


@torch.inference_mode()
def split_prefix(
    model: Any,
    local_blocks: Sequence[torch.Tensor],
    recompute_ids: Sequence[int],
    fetch: Callable[[], Fetched],
) -> tuple[DynamicCache, Fetched, float]:
    """Recompute `recompute_ids` after L1's blocks while `fetch` runs on a thread; join both.

    Exact: the fetched blocks' K and V depend only on the tokens before them, which the cache
    holds once the recompute is done. Returns the joined cache, what was fetched (a short fetch
    leaves a shorter prefix, still contiguous) and the seconds the recompute took.
    """
    result: list[Fetched] = []
    failure: list[BaseException] = []
    device = next(model.parameters()).device
    # On CUDA the fetch's copies and decoding go on a stream of their own, so they overlap the
    # recompute's kernels instead of queueing behind them on the default stream.
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run() -> None:
        try:
            if side is None:
                result.append(fetch())
            else:
                with torch.cuda.stream(side):
                    result.append(fetch())
        except BaseException as exc:  # re-raised below, on the request's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="kvpool-split-fetch", daemon=True)
    thread.start()
    started = time.perf_counter()
    cache = blocks_to_cache(local_blocks, model.config)
    if recompute_ids:
        input_ids = torch.tensor([list(recompute_ids)], device=device)  # [1, recomputed]
        model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    recompute_s = time.perf_counter() - started
    thread.join()
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    if failure:
        raise failure[0]
    fetched = result[0]
    if fetched.blocks:
        kv = torch.cat(fetched.blocks, dim=3)  # [L, 2, H, fetched tokens, D]
        for index in range(kv.shape[0]):
            cache.update(kv[index, 0].unsqueeze(0), kv[index, 1].unsqueeze(0), index)
    return cache, fetched, recompute_s
