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
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from kvpool.errors import DataLoss
from workers.kv.assembly import Assembly, Refused
from workers.kv.hashing import BlockHash, block_key
from workers.kv.layout import blocks_to_cache
from workers.models import cache_keyword
from workers.node_tier import NodeTier
from workers.plan import Estimates
from workers.tiers import BlockStore, LocalBlocks

log = logging.getLogger(__name__)

Decode = Callable[[Any, BlockHash], torch.Tensor]  # encoded value -> [L, 2, H, T, D]


@dataclass(frozen=True, slots=True)
class Tiers:
    """A worker's tiers below the device, in the order a prefix is looked up in them."""

    local: LocalBlocks  # L1: this worker's decoded blocks
    node: NodeTier | None = None  # L2: the node's shared memory, where the worker has one
    store: BlockStore | None = None  # L3: the KVStore
    estimates: Estimates | None = None  # fed with every lookup's and fetch's timing


@dataclass(slots=True)
class Located:
    """Where the prefix of a chain of hashes is cached; nothing fetched yet but L1's blocks."""

    local: list[torch.Tensor]  # L1's leading run, each [layers, 2, kv_heads, block_tokens, dim]
    node_refs: list[Any] = field(default_factory=list)  # the node tier's run after L1
    store_blocks: int = 0  # the store's run after those
    node_error: bool = False  # the node tier could not be reached: the prefix may be short
    store_error: bool = False  # the store could not be reached: the prefix may be short

    @property
    def cached_blocks(self) -> int:
        return len(self.local) + len(self.node_refs) + self.store_blocks


@dataclass(slots=True)
class Fetched:
    """What `fetch_run` brought: blocks per tier, refused blocks, tiers that failed."""

    node_blocks: int = 0
    store_blocks: int = 0
    corrupt_blocks: int = 0
    node_error: bool = False
    store_error: bool = False

    @property
    def blocks(self) -> int:
        return self.node_blocks + self.store_blocks


class Sink(Protocol):
    """Where `fetch_run` puts each block it fetched, in order."""

    def add(self, data: Any, block_hash: BlockHash, tier: str) -> None:
        """Verify and take one value read from `tier` ("node" or "store"); DataLoss if refused."""

    def finish(self) -> Refused | None:
        """After the last `add`: the first block (counted from this sink's first) refused late,
        where verification finishes only once the whole run is in (on a GPU); or None."""


class Decoded:
    """Decodes each value to its own tensor and adds it to L1 (the windowed and plain paths)."""

    def __init__(self, decode: Decode, local: LocalBlocks) -> None:
        self._decode, self._local = decode, local
        self.blocks: list[torch.Tensor] = []  # each [L, 2, H, T, D]

    def add(self, data: Any, block_hash: BlockHash, tier: str) -> None:
        block = self._decode(data, block_hash)
        self._local.put(block_hash, block)
        self.blocks.append(block)

    def finish(self) -> Refused | None:
        return None  # `decode` checked each block as it went


class Assembled:
    """Decodes each value into its slice of an `Assembly`, as the values arrive (a planned hit).

    What L1 and the node tier should keep of the run is only remembered here; `keep` hands it to
    the write-behind thread, so copying it never delays the first token.
    """

    def __init__(self, into: Assembly, share: bool = True) -> None:
        self.into = into
        self._share = share  # keep store values for a node tier (there is one to take them)
        self._first = into.blocks
        self._hashes: list[BlockHash] = []
        self._from_store: list[tuple[str, Any]] = []
        self._node_blocks = 0  # the run's first blocks came from the node tier, the rest not

    def add(self, data: Any, block_hash: BlockHash, tier: str) -> None:
        self.into.add_encoded(data, block_hash)
        self._hashes.append(block_hash)
        self._node_blocks += tier == "node"
        if tier == "store" and self._share:
            self._from_store.append((block_key(block_hash), data))

    def finish(self) -> Refused | None:
        refused = self.into.finish()
        if refused is None:
            return None
        return Refused(refused.index - self._first, refused.error)

    def keep(self, writer: "Keeper") -> None:
        """Queue the run's blocks for L1 and its store blocks for the node tier."""
        good = self.into.blocks - self._first
        blocks = [(h, self.into.block(self._first + i)) for i, h in enumerate(self._hashes[:good])]
        shared = self._from_store[: max(0, good - self._node_blocks)]
        writer.keep(blocks, shared)


class Keeper(Protocol):
    """Takes a fetched run in the background: blocks for L1, store values for the node tier."""

    def keep(
        self, blocks: list[tuple[BlockHash, torch.Tensor]], shared: list[tuple[str, Any]]
    ) -> bool: ...


def locate(hashes: Sequence[BlockHash], tiers: Tiers) -> Located:
    """How far each tier holds the prefix of `hashes`, in order; only L1's blocks are taken."""
    found = Located(tiers.local.prefix(hashes))
    rest = [block_key(h) for h in hashes[len(found.local) :]]
    estimates = tiers.estimates
    if rest and tiers.node is not None:
        started = time.perf_counter()
        try:
            found.node_refs = tiers.node.refs(rest)
        except Exception as exc:  # the tier's actor is gone or slow: go on without it
            log.warning("node tier lookup failed, treating as a miss: %s", exc)
            found.node_error = True
        if estimates is not None:
            estimates.observe_latency("node", time.perf_counter() - started)
        rest = rest[len(found.node_refs) :]
    if rest and tiers.store is not None:
        started = time.perf_counter()
        try:
            found.store_blocks = tiers.store.lookup(rest)
        except Exception as exc:  # store down or slow: compute instead
            log.warning("store lookup failed, treating as a miss: %s", exc)
            found.store_error = True
        if estimates is not None:
            estimates.observe_latency("store", time.perf_counter() - started)
    return found


def fetch_run(
    found: Located, hashes: Sequence[BlockHash], start: int, tiers: Tiers, sink: Sink
) -> Fetched:
    """Fetch blocks [start, found.cached_blocks) (start >= L1's run) into `sink`, in order.

    Store values are handed on as they arrive (`get_iter`), so decoding overlaps the transfer.
    """
    out = Fetched()
    node, store = tiers.node, tiers.store
    node_start = len(found.local)
    node_end = node_start + len(found.node_refs)
    try:
        whole = True
        if start < node_end and node is not None:
            refs = found.node_refs[start - node_start :]
            whole = _fetch_node(refs, hashes[start:node_end], node, sink, out, tiers.estimates)
        first, end = max(start, node_end), found.cached_blocks
        if whole and first < end and store is not None:
            _fetch_store(hashes[first:end], store, sink, out, tiers.estimates)
    finally:
        refused = sink.finish()  # always: an assembly gives back the pinned slots it leased
    if refused is not None:
        _refuse(refused, out, hashes[start:], node, store)
    return out


def _fetch_node(
    refs: Sequence[Any],
    hashes: Sequence[BlockHash],
    node: NodeTier,
    sink: Sink,
    out: Fetched,
    estimates: Estimates | None,
) -> bool:
    """The node tier's run into `sink`; True when every block of it arrived and verified."""
    started = time.perf_counter()
    try:
        values = node.read(refs)
    except Exception as exc:  # owner gone or object lost: a shorter prefix
        log.warning("node tier read failed, treating as a miss: %s", exc)
        out.node_error = True
        return False
    nbytes = 0
    for value, block_hash in zip(values, hashes, strict=True):
        if not _verified(sink, value, block_hash, node, "node", out):
            return False
        nbytes += len(value)
        out.node_blocks += 1
    if estimates is not None:
        estimates.observe_fetch("node", nbytes, time.perf_counter() - started)
    return True


def _fetch_store(
    hashes: Sequence[BlockHash],
    store: BlockStore,
    sink: Sink,
    out: Fetched,
    estimates: Estimates | None,
) -> None:
    """The store's run into `sink`, each value as it arrives; a shorter run on any error."""
    keys = [block_key(h) for h in hashes]
    started = time.perf_counter()
    nbytes = 0
    try:
        for (_, data), block_hash in zip(store.get_iter(keys), hashes, strict=False):
            if data is None:  # evicted between lookup and get
                break
            if not _verified(sink, data, block_hash, store, "store", out):
                break
            nbytes += len(data)
            out.store_blocks += 1
    except Exception as exc:  # store down or slow: compute the rest instead
        log.warning("store get failed, treating as a miss: %s", exc)
        out.store_error = True
        return
    if estimates is not None:
        estimates.observe_fetch("store", nbytes, time.perf_counter() - started)


def _refuse(
    refused: Refused,
    out: Fetched,
    hashes: Sequence[BlockHash],
    node: NodeTier | None,
    store: BlockStore | None,
) -> None:
    """A block the sink refused at its finish ends the run there (hashes: the run's)."""
    bad = refused.index
    key = block_key(hashes[bad])
    log.warning("refusing cached block %s: %s", key, refused.error)
    out.corrupt_blocks += 1
    _forget(node if bad < out.node_blocks else store, key)
    out.store_blocks = max(0, min(out.store_blocks, bad - out.node_blocks))
    out.node_blocks = min(out.node_blocks, bad)


def _verified(
    sink: Sink, data: Any, block_hash: BlockHash, tier: Any, tier_name: str, out: Fetched
) -> bool:
    try:
        sink.add(data, block_hash, tier_name)
        return True
    except DataLoss as exc:
        key = block_key(block_hash)
        out.corrupt_blocks += 1
        log.warning("refusing cached block %s: %s", key, exc)
        _forget(tier, key)
        return False


def _forget(tier: Any, key: str) -> None:
    try:
        tier.delete([key])
    except Exception as exc:  # hygiene; the next reader verifies again anyway
        log.warning("could not delete refused block %s: %s", key, exc)


@torch.inference_mode()
def split_prefix(
    model: Any,
    local_blocks: Sequence[torch.Tensor],
    recompute_ids: Sequence[int],
    fetch: Callable[[], tuple[Fetched, Assembly]],
) -> tuple[DynamicCache, Fetched]:
    """Recompute `recompute_ids` after L1's blocks while `fetch` runs on a thread; join both.

    Exact: the fetched blocks' K and V depend only on the tokens before them, which the cache
    holds once the recompute is done. Returns the joined cache, what was fetched (a short fetch
    leaves a shorter prefix, still contiguous).
    """
    result: list[tuple[Fetched, Assembly]] = []
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
    cache = blocks_to_cache(local_blocks, model.config)
    if recompute_ids:
        input_ids = torch.tensor([list(recompute_ids)], device=device)  # [1, recomputed]
        model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache}
        )
    thread.join()
    if side is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
    if failure:
        raise failure[0]
    fetched, assembly = result[0]
    if side is not None:
        assembly.used_on(current)  # allocated on the side stream, read on this one
    if assembly.blocks:
        for index, (keys, values) in enumerate(assembly.layers()):
            cache.update(keys, values, index)  # appends: one copy, onto the recomputed blocks
    return cache, fetched
