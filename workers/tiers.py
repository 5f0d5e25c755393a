"""The worker's own cache tier, L1 (decoded blocks in the worker's memory), and the write-behind
queue that feeds L1, the node tier (L2, workers.node_tier) and the KVStore (L3) without making
decode wait.

L1 holds blocks exactly as a store hit would deliver them (encoded, then decoded), not the exact
tensors the model produced. A prompt therefore gets the same KV, and so the same output, whether
its prefix came from this worker's L1 or from the store by way of another worker.
"""

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workers.api import LocalStats, WriteStats
from workers.kv.hashing import BlockHash, block_key

log = logging.getLogger(__name__)


class BlockStore(Protocol):
    """The KVStore as the worker sees it; `services.store.client.StoreClient` implements it."""

    def lookup(self, keys: Sequence[str]) -> int: ...

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]: ...

    def get_iter(self, keys: Sequence[str]) -> Iterator[tuple[str, bytes | None]]:
        """(key, value or None if missing) for every key, in order, each as soon as it arrives."""
        ...

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int: ...

    def delete(self, keys: Sequence[str]) -> int: ...


class BlockSink(Protocol):
    """A tier that write-behind only writes to (the node tier)."""

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int: ...


class LocalBlocks:
    """L1: a byte-bounded LRU of decoded blocks, each [layers, 2, kv_heads, block_tokens, head_dim].

    Thread-safe: request threads read it while the write-behind thread fills it. Tensors are
    shared, never copied, and never modified by readers (`blocks_to_cache` concatenates them
    into new tensors).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"L1 capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def prefix(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor]:
        """The blocks of the longest leading run of `hashes` held here (marked recently used)."""
        found: list[torch.Tensor] = []
        with self._lock:
            for h in hashes:
                block = self._blocks.get(h)
                if block is None:
                    break
                self._blocks.move_to_end(h)
                found.append(block)
            self._hits += len(found)
            self._misses += len(hashes) - len(found)
        return found

    def get(self, block_hash: BlockHash) -> torch.Tensor | None:
        """One block, or None (marked recently used, and counted as a hit or a miss)."""
        with self._lock:
            block = self._blocks.get(block_hash)
            if block is None:
                self._misses += 1
                return None
            self._blocks.move_to_end(block_hash)
            self._hits += 1
            return block

    def __contains__(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return block_hash in self._blocks

    def put(self, block_hash: BlockHash, block: torch.Tensor) -> None:
        size = block.numel() * block.element_size()
        if size > self.capacity_bytes:
            return  # cannot fit even alone; keeping it would evict everything for nothing
        with self._lock:
            old = self._blocks.pop(block_hash, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._blocks[block_hash] = block
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self._evictions += 1

    def clear(self) -> None:
        """Forget every block (benchmarks: make the next request find its prefix elsewhere)."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def stats(self) -> LocalStats:
        with self._lock:
            return LocalStats(
                blocks=len(self._blocks),
                bytes=self._bytes,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )


# (hash, block [layers, 2, kv_heads, block_tokens, head_dim]) pairs, in chain order
WriteBatch = list[tuple[BlockHash, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class _LocalOnly:
    """Computed blocks the tiers already hold: encoded and decoded for L1, written nowhere."""

    blocks: WriteBatch

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True, slots=True)
class _Keep:
    """A fetched run to keep: blocks (views of the run's cache) for L1, store values for L2."""

    blocks: WriteBatch
    shared: list[tuple[str, Any]]

    def __len__(self) -> int:
        return len(self.blocks)


class WriteBehind:
    """A background thread that encodes completed blocks, puts them in the node tier and the
    store, and adds them to L1.

    `submit` never blocks: when the queue is full the batch is dropped and counted, because a
    block the store misses costs a later prefill, while a stalled decode costs every token now.
    With `local=None` (an engine with a cache of its own, as vLLM behind the connector) blocks
    are encoded and stored only, never decoded back, and `decode` is None.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor, BlockHash], bytes],
        decode: Callable[[bytes, BlockHash], torch.Tensor] | None,
        local: LocalBlocks | None,
        store: BlockStore | None,
        max_pending_blocks: int = 256,
        ttl_s: int | None = None,
        node: BlockSink | None = None,
    ) -> None:
        if (local is None) != (decode is None):
            raise ValueError("WriteBehind decodes for L1 only: give decode and local, or neither")
        self._encode, self._decode = encode, decode
        self._local, self._store, self._ttl_s = local, store, ttl_s
        self._node = node
        self._queue: queue.Queue[WriteBatch | _Keep | _LocalOnly | None] = queue.Queue()
        self._max_pending = max_pending_blocks
        self._pending = 0
        self._submitted = self._stored = self._dropped = self._failed = 0
        self._dropped_copies = 0  # of fetched runs, for L1 and the node tier (`keep`)
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvpool-write-behind", daemon=True)
        self._thread.start()

    def submit(self, batch: WriteBatch, shared: bool = True) -> bool:
        """Queue `batch` (tensors the caller will not modify). False when it was dropped.

        `shared=False`: blocks the node tier and the store already hold (a prefix the fetch plan
        recomputed): they go to L1 only.
        """
        if not batch:
            return True
        with self._lock:
            if self._pending + len(batch) > self._max_pending:
                self._dropped += len(batch)
                return False
            self._pending += len(batch)
            self._submitted += len(batch)
        self._queue.put(batch if shared else _LocalOnly(batch))
        return True

    def keep(self, blocks: WriteBatch, shared: list[tuple[str, Any]]) -> bool:
        """Queue a fetched run: copies of `blocks` (already decoded, views of a cache being
        used) go to L1, and `shared` (encoded values read from the store) to the node tier, so
        the node's other workers find them there. Never blocks; False when it was dropped."""
        if not blocks:
            return True
        with self._lock:
            if self._pending + len(blocks) > self._max_pending:
                self._dropped_copies += len(blocks)
                return False
            self._pending += len(blocks)
        self._queue.put(_Keep(blocks, shared))
        return True

    def write(self, batch: WriteBatch) -> int:
        """Write `batch` now, in the caller's thread (a caller that waits for its own blocks,
        and only those); returns the blocks the store accepted."""
        try:
            stored, failed = self._write(batch)
        except Exception:  # as in the thread: a block not written is a later miss
            log.exception("write of %d blocks failed", len(batch))
            stored, failed = 0, len(batch)
        with self._lock:
            self._submitted += len(batch)
            self._stored += stored
            self._failed += failed
        return stored

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def stats(self) -> WriteStats:
        with self._lock:
            return WriteStats(
                self._submitted, self._stored, self._dropped, self._failed, self._pending,
                self._dropped_copies,
            )  # fmt: skip

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            stored = failed = 0
            try:
                if isinstance(batch, _Keep):
                    self._keep(batch)
                elif isinstance(batch, _LocalOnly):
                    self._write(batch.blocks, shared=False)
                else:
                    stored, failed = self._write(batch)
            except Exception:  # the thread must survive anything one batch does
                log.exception("write-behind batch of %d blocks failed", len(batch))
                failed = len(batch)
            with self._lock:
                self._pending -= len(batch)
                self._stored += stored
                self._failed += failed
                self._lock.notify_all()

    def _keep(self, run: _Keep) -> None:
        for block_hash, block in run.blocks if self._local is not None else ():
            # A copy: the view would pin the whole run's tensor for as long as L1 holds one block.
            self._local.put(block_hash, block.clone())
        if self._node is not None and run.shared:
            try:
                self._node.put_many(run.shared)
            except Exception as exc:  # a later store read, never a failed request
                log.warning("node tier put of %d fetched blocks failed: %s", len(run.shared), exc)

    def _write(self, batch: WriteBatch, shared: bool = True) -> tuple[int, int]:
        items: list[tuple[str, bytes]] = []
        for block_hash, block in batch:
            data = self._encode(block, block_hash)
            if self._local is not None and self._decode is not None:  # as stored
                self._local.put(block_hash, self._decode(data, block_hash))
            items.append((block_key(block_hash), data))
        if not shared:
            return 0, 0
        if self._node is not None:
            try:  # first: a worker of this node may ask for these blocks before the store has them
                self._node.put_many(items)
            except Exception as exc:  # a later miss, never a failed request
                log.warning("write-behind: node tier put of %d blocks failed: %s", len(items), exc)
        if self._store is None:
            return 0, 0
        try:
            stored = self._store.put_many(items, ttl_s=self._ttl_s)
        except Exception as exc:  # a failing store is a later miss, never a failed request
            log.warning("write-behind: store put of %d blocks failed: %s", len(items), exc)
            return 0, len(items)
        return stored, 0
