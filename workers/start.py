"""Where a sequence starts: the cache rebuilt from the tiers, per the fetch plan.

A plain cache follows the fetch plan (workers.plan): fetch the cached prefix, recompute it, or
both at once. A windowed request or a model with a native sliding window starts on a block
boundary from the sink and recent-window blocks (workers.window). Split from `KVWorker` so the
worker orchestrates and this module owns the hit path's choices.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from workers.api import WorkerConfig
from workers.engine import Engine
from workers.fetch import Assembled, Fetched, Keeper, fetch_run, locate, split_prefix
from workers.kv.assembly import Assembly
from workers.kv.block import Staging
from workers.kv.bounds import CacheWindow
from workers.kv.hashing import BlockHash, block_key
from workers.kv.layout import blocks_to_cache
from workers.models import LoadedModel
from workers.node_tier import NodeTier
from workers.plan import CachedRun, Estimates, choose
from workers.prefix import CachedPrefix, find_blocks, find_prefix
from workers.tiers import BlockStore, LocalBlocks
from workers.window import rebuild


class _Worker(Protocol):
    """What a start is found with: the worker's model, tiers, estimates and counters."""

    config: WorkerConfig
    engine: Engine
    loaded: LoadedModel
    local: LocalBlocks
    node: NodeTier | None
    store: BlockStore | None
    estimates: Estimates

    staging: Staging | None  # pinned host memory for block payloads bound for a GPU
    writer: Keeper  # takes copies of fetched blocks for L1 and the node tier, in the background

    def decode_stored(self, data: bytes, block_hash: BlockHash) -> torch.Tensor: ...

    def count(self, **deltas: int) -> None: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Start:
    """A cache to continue from, the tokens it stands for, and how many came from L1."""

    past: DynamicCache | None = None
    tokens: int = 0
    local_tokens: int = 0
    node_tokens: int = 0
    plan: str = "none"
    recomputed_tokens: int = 0  # in `past` (a split) or left to the engine (recompute)
    # The prefix's first tokens that the node tier or the store already holds, fetched or not:
    # their blocks, once computed again, go to L1 only (writing them back would only load the
    # link the plan chose to avoid).
    stored_tokens: int = 0


class Starts:
    """Finds a request's start in the tiers of one worker (its L1, node tier and store)."""

    def __init__(self, worker: _Worker, block_bytes: int) -> None:
        self.w = worker
        self.block_bytes = block_bytes  # one encoded block, header included: the plan's weight

    def cached_prefix(self, hashes: Sequence[BlockHash]) -> CachedPrefix:
        prefix = find_prefix(hashes, self.w.local, self.w.store, self.w.decode_stored, self.w.node,
                             self.w.estimates)  # fmt: skip
        if prefix.corrupt_blocks or prefix.store_error:
            self.w.count(corrupt_blocks=prefix.corrupt_blocks, store_errors=int(prefix.store_error))
        return prefix

    def find(
        self,
        hashes: list[BlockHash],
        window: CacheWindow | None,
        length: int,
        sequence: Sequence[int] | None = None,
        plan_mode: str = "",
    ) -> "Start":
        """Where to start a sequence of `length` tokens: the cache rebuilt from stored blocks.

        A plain cache (no window, no native sliding window) whose `sequence` is given follows
        the fetch plan (workers.plan): fetch the cached prefix, recompute it, or both at once.

        Plain caches start after the longest cached prefix. A model with a native sliding
        window, or a windowed request, starts on a block boundary before the last token, since
        its cache cannot be cropped back. A windowed request needs only the sink blocks and the
        recent window's blocks at the latest such boundary; when one of those is missing, it
        falls back to the plain prefix before the first eviction and recomputes the rest.
        """
        block_tokens = self.w.config.block_tokens
        usable = len(hashes)
        if window is not None or self.w.engine.native_window is not None:
            usable = min(usable, (length - 1) // block_tokens)
        if window is not None:
            boundary = self._window_boundary(hashes[:usable], window)
            if boundary:
                needed = window.blocks_for_state(boundary)
                found = find_blocks({i: hashes[i] for i in needed}, self.w.local, self.w.store,
                                    self.w.decode_stored, self.w.node)  # fmt: skip
                if found.corrupt_blocks or found.store_error:
                    self.w.count(corrupt_blocks=found.corrupt_blocks,
                                store_errors=int(found.store_error))  # fmt: skip
                if len(found.blocks) == len(needed):
                    past = rebuild(found.blocks, boundary, window, self.w.engine.rerotator(),
                                   self.w.loaded.model.config)  # fmt: skip
                    tokens = boundary * block_tokens
                    local = tokens if found.local_blocks == len(needed) else 0
                    return Start(past, tokens, local, plan="fetch")
            usable = min(usable, window.plain_blocks)  # the blocks before the first eviction
        if window is None and self.w.engine.native_window is None and sequence is not None:
            return self._planned(hashes[:usable], sequence, plan_mode or self.w.config.fetch_plan)
        prefix = self.cached_prefix(hashes[:usable])
        if not prefix.blocks:
            return Start()
        past = blocks_to_cache(prefix.blocks, self.w.loaded.model.config)
        tokens = len(prefix.blocks) * block_tokens
        return Start(
            past, tokens, prefix.local_blocks * block_tokens, prefix.node_blocks * block_tokens,
            plan="fetch" if prefix.node_blocks + prefix.store_blocks else "none",
        )  # fmt: skip

    def _planned(self, hashes: list[BlockHash], sequence: Sequence[int], mode: str) -> "Start":
        """The cache per the fetch plan chosen for this prompt (workers.plan)."""
        size = self.w.config.block_tokens
        found = locate(hashes, self.w.local, self.w.node, self.w.store, self.w.estimates)
        run = CachedRun(
            block_tokens=size,
            prompt_tokens=len(sequence),
            local_blocks=len(found.local),
            node_blocks=len(found.node_refs),
            store_blocks=found.store_blocks,
            block_bytes=self.block_bytes,
        )
        plan = choose(run, self.w.estimates, mode)
        log.debug(
            "fetch plan %s: %d tokens, cached blocks L1 %d node %d store %d, split at %d, "
            "predicted %s", plan.kind, len(sequence), run.local_blocks, run.node_blocks,
            run.store_blocks, plan.split_block,
            {k: round(v * 1000, 1) for k, v in plan.predicted_s.items()},
        )  # fmt: skip
        local = len(found.local)

        def fetch(first: int, base: Sequence[torch.Tensor]) -> tuple[Fetched, Assembly]:
            """Blocks [first, cached) decoded as they arrive into one assembly, after `base`."""
            fetching = run.cached_blocks - first if plan.kind != "recompute" else 0
            into = Assembly(self.w.loaded.geometry, size, len(base) + fetching,
                            self.w.loaded.device, self.w.staging)  # fmt: skip
            for block in base:
                into.add(block)
            if not fetching:
                return Fetched(), into
            sink = Assembled(into, share=self.w.node is not None)
            fetched = fetch_run(found, hashes, first, self.w.node, self.w.store, sink,
                                self.w.estimates)  # fmt: skip
            sink.keep(self.w.writer)  # L1 and the node tier take copies in the background
            return fetched, into

        recomputed = 0
        if mode == "auto":
            self.w.estimates.observe_plan(plan.kind)
        if plan.kind == "split":
            split = plan.split_block
            began = time.perf_counter()
            past, fetched, _ = split_prefix(
                self.w.loaded.model, found.local, sequence[local * size : split * size],
                lambda: fetch(split, ()),
            )  # fmt: skip
            # How well the recompute and the fetch overlapped, for the next splits' predictions.
            self.w.estimates.observe_split(plan.overlap_s, time.perf_counter() - began)
            recomputed = (split - local) * size
            tokens = (split + fetched.blocks) * size
        else:
            if plan.kind == "recompute":
                recomputed = (run.cached_blocks - local) * size
            fetched, into = fetch(local, found.local)
            past = into.cache(self.w.loaded.model.config) if into.blocks else None
            tokens = into.blocks * size
        if fetched.corrupt_blocks or fetched.store_error or found.store_error:
            self.w.count(corrupt_blocks=fetched.corrupt_blocks,
                        store_errors=int(fetched.store_error or found.store_error))  # fmt: skip
        return Start(
            past, tokens, local * size, fetched.node_blocks * size, plan=plan.kind,
            recomputed_tokens=recomputed,
            # A recompute leaves the located blocks where they are; a short fetch's missing or
            # refused blocks are written again.
            stored_tokens=run.cached_blocks * size if plan.kind == "recompute" else tokens,
        )  # fmt: skip

    def _window_boundary(self, hashes: list[BlockHash], window: CacheWindow) -> int:
        """The latest block boundary after the first eviction whose window is cached, or 0.

        The latest boundary is tried first, then earlier ones, as far back as a window's worth of
        blocks: a session's next turn usually finds every block of its previous turn, but not the
        one block that its new input completes. Only hashes are looked up here; blocks are
        fetched once the boundary is chosen.
        """
        latest = len(hashes)
        span = 2 * (window.max_cache_tokens // window.block_tokens) + 2
        earliest = max(latest - span, window.plain_blocks)
        if earliest > latest:
            return 0
        # The recent blocks of every candidate boundary start at or after `low`.
        low = window.first_recent_block(earliest)
        run = hashes[low:latest]
        present = 0
        for block_hash in run:  # the leading run held in L1
            if block_hash not in self.w.local:
                break
            present += 1
        if present < len(run) and self.w.store is not None:
            try:
                present = max(present, self.w.store.lookup([block_key(h) for h in run]))
            except Exception as exc:
                log.warning("store lookup failed, treating as a miss: %s", exc)
                self.w.count(store_errors=1)
        boundary = low + present
        return boundary if boundary >= earliest else 0
