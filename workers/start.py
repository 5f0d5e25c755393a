"""Where a sequence starts: the cache rebuilt from the tiers, per the fetch plan.

Every request finds its start one way: `locate` asks each tier how far the prompt's prefix goes,
the fetch plan (workers.plan) chooses to fetch it, recompute it, or both at once, and
`fetch_run` brings what the plan fetches (workers.fetch). A model with a native sliding window,
or a windowed request, starts on a block boundary before the last token and never splits (its
cache is rebuilt by the engine's chunked prefill); a windowed request first tries the sink and
recent-window blocks at its latest boundary (workers.window). What the start came to is one
`PrefixHit` (workers.hit), which the worker turns into usage.
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from workers.api import WorkerConfig
from workers.engine import Engine
from workers.fetch import (
    Assembled,
    Decode,
    Decoded,
    Fetched,
    Keeper,
    Located,
    Tiers,
    fetch_run,
    locate,
    split_prefix,
)
from workers.hit import PrefixHit
from workers.kv.assembly import Assembly
from workers.kv.bounds import CacheWindow
from workers.kv.hashing import BlockHash
from workers.kv.staging import PinnedRing
from workers.models import LoadedModel
from workers.plan import CachedRun, Plan, choose
from workers.window import rebuild

log = logging.getLogger(__name__)

Count = Callable[..., None]  # the worker's counters: count(corrupt_blocks=1, ...)


@dataclass(frozen=True, slots=True)
class Start:
    """A cache to continue from (None: prefill from the first token) and what it came to."""

    past: DynamicCache | None
    hit: PrefixHit


@dataclass(frozen=True, slots=True)
class HitPath:
    """What a start is found with: the worker's tiers, its model and what takes fetched runs."""

    tiers: Tiers
    engine: Engine
    config: WorkerConfig
    decode: Decode  # an encoded block to its tensor, verified (the windowed path's blocks)
    writer: Keeper  # takes copies of fetched blocks for L1 and the node tier, in the background
    count: Count
    block_bytes: int  # one encoded block, header included: the plan's weight
    staging: PinnedRing | None = None  # pinned host memory for block payloads bound for a GPU

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.loaded


class Starts:
    """Finds a request's start in the tiers of one worker (its L1, node tier and store)."""

    def __init__(self, path: HitPath) -> None:
        self.p = path
        self.size = path.config.block_tokens

    def find(
        self,
        hashes: Sequence[BlockHash],
        sequence: Sequence[int],
        window: CacheWindow | None = None,
        plan_mode: str = "",
    ) -> Start:
        """Where to start `sequence` (its full blocks' chain `hashes`): the cache rebuilt from
        the tiers, per the plan `plan_mode` (or the worker's own).

        Plain caches start after the longest cached prefix. A model with a native sliding
        window, or a windowed request, starts on a block boundary before the last token, since
        its cache cannot be cropped back. A windowed request needs only the sink blocks and the
        recent window's blocks at the latest such boundary; when one of those is missing, it
        falls back to the plain prefix before the first eviction and computes the rest.
        """
        chunked = window is not None or self.p.engine.native_window is not None
        usable = len(hashes)
        if chunked:
            usable = min(usable, (len(sequence) - 1) // self.size)
        if window is not None:
            windowed = self._windowed(hashes[:usable], window)
            if windowed is not None:
                return windowed
            usable = min(usable, window.plain_blocks)  # the blocks before the first eviction
        mode = plan_mode or self.p.config.fetch_plan
        return self._planned(hashes[:usable], sequence, mode, splits=not chunked)

    def _planned(
        self, hashes: Sequence[BlockHash], sequence: Sequence[int], mode: str, splits: bool
    ) -> Start:
        """The cache per the fetch plan chosen for this prompt (workers.plan)."""
        found = locate(hashes, self.p.tiers)
        run = CachedRun(self.size, len(sequence), len(found.local), len(found.node_refs),
                        found.store_blocks, self.p.block_bytes)  # fmt: skip
        plan = self._choose(run, mode, splits)
        local = run.local_blocks
        if plan.kind == "split":
            return self._split(found, hashes, sequence, plan)
        fetched, into = self._fetch(found, hashes, local, found.local, plan)
        self._count(found, fetched)
        past = into.cache(self.p.loaded.model.config) if into.blocks else None
        recompute = plan.kind == "recompute"
        hit = PrefixHit(
            self.size, plan.kind, local, fetched.node_blocks, fetched.store_blocks,
            recomputed_tokens=(run.cached_blocks - local) * self.size if recompute else 0,
            # A recompute leaves the located blocks where they are; a short fetch's missing or
            # refused blocks are written again.
            stored_blocks=run.cached_blocks if recompute else into.blocks,
        )  # fmt: skip
        return Start(past, hit)

    def _choose(self, run: CachedRun, mode: str, splits: bool) -> Plan:
        estimates = self.p.tiers.estimates
        assert estimates is not None  # a worker's tiers always carry its estimates
        plan = choose(run, estimates, mode, splits=splits)
        log.debug(
            "fetch plan %s: %d tokens, cached blocks L1 %d node %d store %d, split at %d, "
            "predicted %s", plan.kind, run.prompt_tokens, run.local_blocks, run.node_blocks,
            run.store_blocks, plan.split_block,
            {k: round(v * 1000, 1) for k, v in plan.predicted_s.items()},
        )  # fmt: skip
        if mode == "auto":
            estimates.observe_plan(plan.kind)
        return plan

    def _fetch(
        self,
        found: Located,
        hashes: Sequence[BlockHash],
        first: int,
        base: Sequence[torch.Tensor],
        plan: Plan,
    ) -> tuple[Fetched, Assembly]:
        """Blocks [first, cached) decoded as they arrive into one assembly, after `base`."""
        fetching = found.cached_blocks - first if plan.kind != "recompute" else 0
        loaded = self.p.loaded
        into = Assembly(loaded.geometry, self.size, len(base) + fetching, loaded.device,
                        self.p.staging)  # fmt: skip
        for block in base:
            into.add(block)
        if not fetching:
            return Fetched(), into
        sink = Assembled(into, share=self.p.tiers.node is not None)
        fetched = fetch_run(found, hashes, first, self.p.tiers, sink)
        sink.keep(self.p.writer)  # L1 and the node tier take copies in the background
        return fetched, into

    def _split(
        self, found: Located, hashes: Sequence[BlockHash], sequence: Sequence[int], plan: Plan
    ) -> Start:
        """Recompute blocks [L1's, split) while [split, cached) are fetched (workers.fetch)."""
        local, split, size = len(found.local), plan.split_block, self.size
        began = time.perf_counter()
        past, fetched = split_prefix(
            self.p.loaded.model, found.local, sequence[local * size : split * size],
            lambda: self._fetch(found, hashes, split, (), plan),
        )  # fmt: skip
        estimates = self.p.tiers.estimates
        assert estimates is not None
        # How well the recompute and the fetch overlapped, for the next splits' predictions.
        estimates.observe_split(plan.overlap_s, time.perf_counter() - began)
        self._count(found, fetched)
        hit = PrefixHit(
            size, "split", local, fetched.node_blocks, fetched.store_blocks,
            split_blocks=split - local, recomputed_tokens=(split - local) * size,
            stored_blocks=split + fetched.blocks,
        )  # fmt: skip
        return Start(past, hit)

    def _windowed(self, hashes: Sequence[BlockHash], window: CacheWindow) -> Start | None:
        """The windowed cache at the latest boundary whose blocks the tiers hold, or None."""
        boundary = self._window_boundary(hashes, window)
        if not boundary:
            return None
        blocks: dict[int, torch.Tensor] = {}
        tiers = [0, 0, 0]  # blocks from L1, the node tier, the store
        for first, end in _runs(window.blocks_for_state(boundary)):
            run = hashes[first:end]
            found = locate(run, self.p.tiers)
            decoded = Decoded(self.p.decode, self.p.tiers.local)
            fetched = fetch_run(found, run, len(found.local), self.p.tiers, decoded)
            self._count(found, fetched)
            got = found.local + decoded.blocks
            if len(got) < len(run):
                return None  # a block is gone or refused: fall back to the plain prefix
            blocks.update(zip(range(first, end), got, strict=True))
            tiers = [tiers[0] + len(found.local), tiers[1] + fetched.node_blocks,
                     tiers[2] + fetched.store_blocks]  # fmt: skip
        past = rebuild(blocks, boundary, window, self.p.engine.rerotator(),
                       self.p.loaded.model.config)  # fmt: skip
        # A windowed start has no other plan: without its blocks it falls back (above).
        plan = "fetch" if tiers[1] + tiers[2] else "none"
        hit = PrefixHit(self.size, plan, tiers[0], tiers[1], tiers[2],
                        window_tokens=boundary * self.size)  # fmt: skip
        return Start(past, hit)

    def _count(self, found: Located, fetched: Fetched) -> None:
        node = int(found.node_error or fetched.node_error)
        store = int(found.store_error or fetched.store_error)
        if fetched.corrupt_blocks or node or store:
            self.p.count(corrupt_blocks=fetched.corrupt_blocks, node_errors=node,
                         store_errors=store)  # fmt: skip

    def _window_boundary(self, hashes: Sequence[BlockHash], window: CacheWindow) -> int:
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
        found = locate(run, self.p.tiers)
        self._count(found, Fetched())
        present = found.cached_blocks
        boundary = low + present
        return boundary if boundary >= earliest else 0


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block indices as runs [first, end) of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
