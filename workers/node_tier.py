"""The node tier (L2): encoded blocks in Ray's object store, shared by every worker of a node.

Ray's object store is shared memory per node: a worker reads another process's object by
mapping it, with no copy and no network. An object lives as long as its owner, the process that
called `ray.put`, so the blocks belong to one actor per node (`NodeTierActor`), not to the
worker that computed them: a worker may die and its blocks stay readable. (Ray 2.56 removed
`ray.put(..., _owner=...)`; an actor that puts an object itself owns it.)

Who creates it: the gateway's worker pool, one named actor per node (`start_node_tiers`), owned
by the gateway process, which also owns the workers; so the tier outlives every worker and goes
away with the gateway (L3, the KVStore, is what survives restarts). A worker finds its node's
actor by name; when there is none (no Ray, or a node joined after the pool started) it runs
without L2. Values are the same encoded, checksummed blocks as the store's: a reader verifies
them exactly like a store value, so a bad actor or a stale object is a miss, never a wrong KV.

The actor keeps, per block key, the ObjectRef and its size in a byte-bounded LRU. Readers get
the refs of a leading run of keys in one call and then `ray.get` them (zero-copy numpy uint8
arrays); an evicted ref that a reader still holds stays valid until the reader drops it (Ray's
borrowing), so eviction never breaks a read in progress.
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

from workers.api import NodeTierStats

log = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "kvpool-node-tier-"
RAY_NAMESPACE = "kvpool"  # explicit, so gateways and tools of other jobs find the same actors
DEFAULT_NODE_TIER_BYTES = 2 << 30


class ByteLru:
    """Key -> (value, size), byte-bounded, least recently used evicted first (not thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"node tier capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self.evictions = 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: Any, size: int) -> bool:
        """False when `size` exceeds the whole capacity (it would only evict everything)."""
        if size > self.capacity_bytes:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, (_, evicted) = self._items.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1
        return True

    def delete(self, key: str) -> bool:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
        return item is not None


class NodeTierActor:
    """The per-node owner of L2's objects (run as a threaded Ray actor, no CPU reserved)."""

    def __init__(self, capacity_bytes: int) -> None:
        import ray

        self._ray = ray
        self._lru = ByteLru(capacity_bytes)
        self._lock = threading.Lock()
        self._hits = self._misses = self._puts = 0
        self._node_id = ray.get_runtime_context().get_node_id()

    def put(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Own a copy of each value; returns how many were kept."""
        import numpy as np

        kept = 0
        for key, data in items:
            # A uint8 array is stored out of band, so readers map it without a copy.
            ref = self._ray.put(np.frombuffer(data, dtype=np.uint8))
            with self._lock:
                kept += self._lru.put(key, ref, len(data))
                self._puts += 1
        return kept

    def refs(self, keys: Sequence[str]) -> list[Any]:
        """The refs of the leading run of `keys` held here.

        Returned inside a list, so Ray hands the caller references, not the values.
        """
        found: list[Any] = []
        with self._lock:
            for key in keys:
                ref = self._lru.get(key)
                if ref is None:
                    break
                found.append(ref)
            self._hits += len(found)
            self._misses += len(keys) - len(found)
        return found

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(self._lru.delete(key) for key in keys)

    def stats(self) -> NodeTierStats:
        with self._lock:
            return NodeTierStats(
                node_id=self._node_id,
                blocks=len(self._lru),
                bytes=self._lru.bytes,
                capacity_bytes=self._lru.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._lru.evictions,
                puts=self._puts,
            )


def actor_name(node_id: str) -> str:
    return ACTOR_NAME_PREFIX + node_id


def start_node_tiers(
    capacity_bytes: int = DEFAULT_NODE_TIER_BYTES, skip: Collection[str] = ()
) -> dict[str, Any]:
    """One node tier actor on every live node of the Ray cluster but those in `skip`.

    The caller owns the actors it creates: they live as long as the caller holds the handles
    returned here, so it must keep them (a second handle got by name does not keep an actor
    alive). Returns node id -> actor handle, for the nodes not skipped.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handles = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        if node_id in skip:
            continue
        handles[node_id] = (
            ray.remote(NodeTierActor)
            .options(
                name=actor_name(node_id),
                namespace=RAY_NAMESPACE,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=16,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            )
            .remote(capacity_bytes)
        )
    # Wait until they answer, so workers started next find them.
    ray.get([h.stats.remote() for h in handles.values()], timeout=120)
    return handles


def stop_node_tiers(handles: dict[str, Any]) -> None:
    import ray

    for handle in handles.values():
        try:
            ray.kill(handle, no_restart=True)
        except Exception as exc:  # already gone with its node
            log.debug("node tier actor already gone: %s", exc)


class NodeTier:
    """A worker's view of its node's tier: lookups return refs, reads map the objects.

    Every call is bounded by `timeout_s`; a failing tier is a miss for the caller to count,
    never a failed request.
    """

    def __init__(self, handle: Any, node_id: str, timeout_s: float = 5.0) -> None:
        self._handle, self.node_id, self._timeout_s = handle, node_id, timeout_s

    @classmethod
    def for_this_node(cls, timeout_s: float = 5.0) -> "NodeTier | None":
        """The tier of the node this process runs on, or None (no Ray, or no tier there)."""
        import ray

        if not ray.is_initialized():
            return None
        node_id = ray.get_runtime_context().get_node_id()
        try:
            handle = ray.get_actor(actor_name(node_id), namespace=RAY_NAMESPACE)
        except ValueError:
            log.info("no node tier on node %s; running without L2", node_id)
            return None
        return cls(handle, node_id, timeout_s)

    def refs(self, keys: Sequence[str]) -> list[Any]:
        """The refs of the leading run of `keys` that the node's tier holds."""
        if not keys:
            return []
        import ray

        return list(ray.get(self._handle.refs.remote(list(keys)), timeout=self._timeout_s))

    def read(self, refs: Sequence[Any]) -> list[Any]:
        """The values of `refs` (read-only numpy uint8 arrays mapped from shared memory)."""
        import ray

        return list(ray.get(list(refs), timeout=self._timeout_s)) if refs else []

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int:
        """Hand blocks to the node's owner and wait until it holds them (write-behind thread)."""
        if not items:
            return 0
        import ray

        return int(ray.get(self._handle.put.remote(list(items)), timeout=max(self._timeout_s, 30)))

    def delete(self, keys: Sequence[str]) -> int:
        import ray

        return int(ray.get(self._handle.delete.remote(list(keys)), timeout=self._timeout_s))

    def stats(self) -> NodeTierStats:
        import ray

        return ray.get(self._handle.stats.remote(), timeout=self._timeout_s)
