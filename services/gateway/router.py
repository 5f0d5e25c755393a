"""Which worker serves a prompt: the one holding most of its prefix, unless it is much busier.

Cost rule (docs/gateway.md): for each live worker

    score = cached_prefix_tokens - load_penalty_tokens * occupancy

where `cached_prefix_tokens` is block_tokens times the number of leading blocks of the prompt's
hash chain that the gateway has sent to that worker, and `occupancy` is how full its batch is:
its open requests over `max_in_flight`, the batch's admission bound (workers.batch decodes them
in one forward pass per step, so a request in a batch costs a fraction of one running alone).
With no bound (`max_in_flight=0`) occupancy is the raw count of open requests.
The highest score wins; ties go to the worker with fewer requests in flight, then to the one
chosen least recently, so an idle cluster spreads requests round-robin. With nothing cached
anywhere this is simply the least-loaded worker. A draining worker (`set_draining`, for
maintenance or a benchmark that must pick a worker) is skipped while any other worker remains.

The gateway cannot see a worker's L1, so it keeps its own record of what it routed where: a
bounded LRU of block hashes per worker, sized like the worker's L1. The record can be wrong in
both directions (the worker evicted a block; another route put it there) and that is fine: it
only steers, and a wrong guess costs a store fetch, never a wrong answer.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from kvpool.errors import ResourceExhausted, Unavailable


@dataclass(frozen=True, slots=True)
class RouterConfig:
    block_tokens: int = 64
    # A full batch (max_in_flight requests; one request when there is no bound) costs as much as
    # this many cached prefix tokens, each request in it a share. A request in a batch of 8 on
    # SmolLM2 and these CPUs decodes about 3x slower than alone; 2048 tokens of prefix is about
    # 6 s of prefill, so a full worker still wins with a long enough prefix. The gateway's
    # settings take their defaults from here (one default per knob).
    load_penalty_tokens: int = 2048
    # Block hashes remembered per worker; 4096 blocks of 64 tokens is 256k tokens, about the L1
    # of a worker with a few GiB for SmolLM2-sized blocks.
    record_blocks: int = 4096
    # Requests one worker runs at once (0: no limit). A request that finds every worker full
    # waits here, in the gateway, not in a worker's queue (where its wait would look like a
    # stalled worker), at most `queue_timeout_s`, and only while fewer than `max_queued` wait:
    # past either it is refused with RESOURCE_EXHAUSTED. Waiters are woken in no fixed order.
    max_in_flight: int = 0
    max_queued: int = 32
    queue_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0 (0: no limit), got {self.max_in_flight}")
        if self.max_queued < 0 or self.queue_timeout_s < 0:
            raise ValueError(
                f"max_queued and queue_timeout_s must be >= 0, got {self.max_queued} and "
                f"{self.queue_timeout_s}"
            )
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.load_penalty_tokens < 0:
            raise ValueError(f"load_penalty_tokens must be >= 0, got {self.load_penalty_tokens}")
        if self.record_blocks < 0:
            raise ValueError(f"record_blocks must be >= 0, got {self.record_blocks}")


@dataclass(frozen=True, slots=True)
class Route:
    """A worker chosen for one request, counted in its in-flight load until `release`d."""

    worker_id: str


class _WorkerRecord:
    __slots__ = ("blocks", "draining", "in_flight", "last_chosen")

    def __init__(self) -> None:
        self.blocks: OrderedDict[Hashable, None] = OrderedDict()
        self.in_flight = 0
        self.last_chosen = 0
        self.draining = False


class Router:
    """Thread-safe: gRPC handler threads route and release concurrently."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self._workers: dict[str, _WorkerRecord] = {}
        self._lock = threading.Condition()  # notified whenever a worker frees up or joins
        self._queued = 0  # requests waiting for a worker below max_in_flight
        self._clock = 0  # a counter, not time: "least recently chosen" needs only an order

    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.setdefault(worker_id, _WorkerRecord())
            self._lock.notify_all()

    def remove_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)
            self._lock.notify_all()  # waiters re-check: none may be left to wait for

    @property
    def queued(self) -> int:
        """Requests waiting for a worker below its `max_in_flight`."""
        with self._lock:
            return self._queued

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def set_draining(self, worker_id: str, draining: bool = True) -> None:
        """A draining worker gets no new requests (while any other worker can take them)."""
        with self._lock:
            record = self._workers.get(worker_id)
            if record is not None:
                record.draining = draining

    def in_flight(self, worker_id: str) -> int:
        with self._lock:
            record = self._workers.get(worker_id)
            return record.in_flight if record else 0

    @staticmethod
    def _prefix_blocks(record: _WorkerRecord, hashes: Sequence[Hashable]) -> int:
        # Chain hashes: block i's hash already commits to blocks 0..i-1, but the record is an LRU
        # and may have dropped an early block, so count leading hits rather than the last hit.
        count = 0
        for h in hashes:
            if h not in record.blocks:
                break
            count += 1
        return count

    def acquire(self, hashes: Sequence[Hashable], exclude: frozenset[str] = frozenset()) -> Route:
        """Pick a worker for a prompt whose full blocks hash to `hashes` (in order).

        The choice and its in-flight count are taken under one lock, so concurrent requests see
        each other's load. When every worker is full the request waits (see RouterConfig). Every
        acquired route must be released once.
        """
        with self._lock:
            candidates = self._wait_for_room(exclude)
            best: tuple[tuple[float, int, int], str] | None = None
            for worker_id, record in candidates.items():
                cached = self._prefix_blocks(record, hashes) * self.config.block_tokens
                score = cached - self.config.load_penalty_tokens * self._occupancy(record)
                # max() on (score, -in_flight, -last_chosen): higher score, then fewer in flight,
                # then least recently chosen.
                key = (score, -record.in_flight, -record.last_chosen)
                if best is None or key > best[0]:
                    best = (key, worker_id)
            if best is None:
                raise Unavailable("no live worker to serve the request")
            _, worker_id = best
            self._clock += 1
            chosen = self._workers[worker_id]
            chosen.last_chosen = self._clock
            chosen.in_flight += 1
            return Route(worker_id)

    def _occupancy(self, record: _WorkerRecord) -> float:
        """How full the worker's batch is: 1.0 at max_in_flight (raw requests with no bound)."""
        most = self.config.max_in_flight
        return record.in_flight / most if most else float(record.in_flight)

    def _wait_for_room(self, exclude: frozenset[str]) -> dict[str, _WorkerRecord]:
        """The workers that may take a request now, waiting for one below max_in_flight."""
        deadline: float | None = None
        try:
            while True:
                candidates = {w: r for w, r in self._workers.items() if w not in exclude}
                if any(not r.draining for r in candidates.values()):
                    candidates = {w: r for w, r in candidates.items() if not r.draining}
                most = self.config.max_in_flight
                if not most or not candidates:
                    return candidates
                free = {w: r for w, r in candidates.items() if r.in_flight < most}
                if free:
                    return free
                full = (
                    f"every worker is running {most} requests "
                    f"(limit --max-requests-per-worker={most})"
                )
                if deadline is None:
                    if self._queued >= self.config.max_queued:
                        raise ResourceExhausted(
                            f"{full} and {self._queued} requests already wait (limit "
                            f"--max-queued-requests={self.config.max_queued}); retry later"
                        )
                    self._queued += 1
                    deadline = time.monotonic() + self.config.queue_timeout_s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(
                        f"{full}, and none freed up in {self.config.queue_timeout_s:g} s "
                        f"(--queue-timeout); retry later"
                    )
                self._lock.wait(left)
        finally:
            if deadline is not None:
                self._queued -= 1

    def record(self, worker_id: str, hashes: Sequence[Hashable]) -> None:
        """Remember that `worker_id` now holds these blocks (it computed or fetched them)."""
        limit = self.config.record_blocks
        with self._lock:
            record = self._workers.get(worker_id)
            if record is None or limit == 0:
                return
            for h in hashes:
                record.blocks[h] = None
                record.blocks.move_to_end(h)
            while len(record.blocks) > limit:
                record.blocks.popitem(last=False)

    def release(self, route: Route) -> None:
        with self._lock:
            record = self._workers.get(route.worker_id)
            if record is not None:
                record.in_flight = max(0, record.in_flight - 1)
                self._lock.notify_all()
