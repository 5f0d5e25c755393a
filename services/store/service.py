"""The KVStore servicer: checks limits, converts from proto, calls the backend, converts back.

It holds no storage logic (that is the backend's) and no wire-format logic (that is `chunks`).
Errors are raised as `kvpool.errors` exceptions; `services.status.ErrorInterceptor` turns them
into status codes.
"""

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import grpc

from kvpool.errors import InvalidArgument, Unavailable
from kvpool.v1 import store_pb2, store_pb2_grpc
from services.store.backends import StorageBackend
from services.store.breaker import Breaker
from services.store.budget import ByteBudget
from services.store.chunks import MAX_TTL_S, SERVICE_NAME, BlockAssembler, get_chunks
from services.store.keys import check_keys
from services.store.limits import StoreLimits
from services.store.metrics import StoreMetrics

__all__ = ["KVStoreServicer", "StoreLimits", "add_to_server", "check_unique"]

T = TypeVar("T")
# The most values one backend write carries (a Put's batch, a Get's read window), beside the
# byte bounds (--batch-bytes, --window): a batch of many tiny values stays short too.
BATCH_VALUES = 256

# A backend failure that took this long is a hung backend, not a refused one (see `_wait`).
SLOW_FAILURE_S = 0.5


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    end: int
    bytes: int


def check_unique(keys: Sequence[str]) -> None:
    """A key asked twice in one Get would be read (and held) twice for nothing."""
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise InvalidArgument(f"key {key!r} appears more than once; ask for each key once")
        seen.add(key)


class _Counts:
    """Totals since the server started, for the Stats call (Prometheus has its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.puts = 0

    def add(self, hits: int = 0, misses: int = 0, puts: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.puts += puts


class KVStoreServicer(store_pb2_grpc.KVStoreServicer):
    """Every backend call runs in a pool and is waited for only until the call's deadline, behind
    a circuit breaker: a hung backend costs each caller at most its own deadline, and once the
    breaker opens, nothing (calls answer UNAVAILABLE at once, which clients treat as a miss)."""

    def __init__(
        self,
        backend: StorageBackend,
        *,
        limits: StoreLimits,
        metrics: StoreMetrics,
        default_ttl_s: int | None = None,
        backend_threads: int = 16,
        breaker: Breaker | None = None,
    ) -> None:
        self._backend = backend
        self._limits = limits
        self._metrics = metrics
        self._default_ttl_s = default_ttl_s or None
        self._counts = _Counts()
        self.budget = ByteBudget(limits.max_inflight_bytes)
        self.breaker = breaker or Breaker("the store's backend")
        metrics.watch(self.budget, self.breaker)
        self._io = ThreadPoolExecutor(max_workers=backend_threads, thread_name_prefix="backend")
        self.data_port: int | None = None  # advertised by Stats once the data path listens

    @property
    def backend(self) -> StorageBackend:
        return self._backend

    # --- deadlines and the backend -----------------------------------------------------------

    def _deadline(self, context: grpc.ServicerContext) -> float:
        """When this call must be done: a little before the client's deadline (so the client
        hears why: UNAVAILABLE from the backend, not its own DEADLINE_EXCEEDED), capped by
        `max_call_s`."""
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self._limits.max_call_s
        remaining -= min(0.1, remaining / 10)
        return time.monotonic() + min(remaining, self._limits.max_call_s)

    def _submit(self, fn: Callable[..., T], *args: object) -> "Future[T]":
        self.breaker.check()
        return self._io.submit(fn, *args)

    def _wait(self, future: "Future[T]", deadline: float) -> T:
        """The backend's answer, or Unavailable once the call's deadline has passed.

        Only slow failures trip the breaker: a refused connection costs nothing to try again
        (and must not delay noticing that Redis is back), a backend that does not answer does.
        """
        started = time.monotonic()
        try:
            result = future.result(timeout=max(0.0, deadline - started))
        except FutureTimeout:
            future.cancel()  # still queued: never runs; running: its thread finishes alone
            self.breaker.failure()
            raise Unavailable(
                "the store's backend did not answer before the call's deadline"
            ) from None
        except Unavailable:
            if time.monotonic() - started >= SLOW_FAILURE_S:
                self.breaker.failure()
            raise
        self.breaker.success()
        return result

    def _call(self, deadline: float, fn: Callable[..., T], *args: object) -> T:
        return self._wait(self._submit(fn, *args), deadline)

    # --- RPCs ----------------------------------------------------------------------------------

    def Lookup(
        self, request: store_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> store_pb2.LookupResponse:
        keys = list(request.keys)
        check_keys(keys, self._limits.max_keys)
        present = self._call(self._deadline(context), self._backend.lookup, keys)
        self.count_lookup(len(keys), present)
        return store_pb2.LookupResponse(present=present)

    def count_lookup(self, keys: int, present: int) -> None:
        self._metrics.hits.labels("Lookup").inc(present)
        self._metrics.misses.labels("Lookup").inc(keys - present)

    def count_get(self, found: int, missing: int, sent_bytes: int) -> None:
        self._counts.add(hits=found, misses=missing)
        self._metrics.hits.labels("Get").inc(found)
        self._metrics.misses.labels("Get").inc(missing)
        self._metrics.sent_bytes.inc(sent_bytes)

    def lookup_keys(self, keys: list[str], deadline: float) -> int:
        """The data path's Lookup through the backend (checked keys; counted)."""
        present = self._call(deadline, self._backend.lookup, keys)
        self.count_lookup(len(keys), present)
        return present

    def Get(self, request: store_pb2.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        keys = list(request.keys)
        check_keys(keys, self._limits.max_keys)
        check_unique(keys)
        deadline = self._deadline(context)
        yield from get_chunks(self.values(keys, deadline), self._limits.chunk_bytes)

    def _sizes(self, keys: list[str]) -> list[int]:
        sizes = getattr(self._backend, "sizes", None)
        if sizes is None:  # a backend that cannot tell: assume the worst a Put may have stored
            return [self._limits.max_block_bytes] * len(keys)
        return [min(n, self.budget.capacity) for n in sizes(keys)]

    def plan(self, sizes: list[int]) -> list[Window]:
        """Windows of about `window_bytes` (at most 256 keys); a larger value goes alone."""
        windows: list[Window] = []
        start = total = 0
        for i, n in enumerate(sizes):
            if i > start and (total + n > self._limits.window_bytes or i - start >= BATCH_VALUES):
                windows.append(Window(start, i, total))
                start, total = i, 0
            total += n
        windows.append(Window(start, len(sizes), total))
        return windows

    def values(self, keys: list[str], deadline: float) -> Iterator[tuple[int, bytes | None]]:
        """Values in request order, read in windows whose bytes are reserved in the budget.

        Value sizes are asked first (one round trip), so each window's bytes are known before it
        is read. The next window is read while this one is sent, when its bytes fit the budget
        at once; otherwise this window's bytes are given back first, then the next one waits.
        """
        windows = self.plan(self._call(deadline, self._sizes, keys))
        budget = self.budget
        reading: list[tuple[Future[list[bytes | None]], int]] = []  # (read, bytes reserved)

        def read(w: Window) -> None:
            future = self._submit(self._backend.get_many, keys[w.start : w.end])
            reading.append((future, w.bytes))

        try:
            budget.acquire(windows[0].bytes, deadline)
            try:
                read(windows[0])
            except BaseException:
                budget.release(windows[0].bytes)
                raise
            for n, w in enumerate(windows):
                future, held = reading[0]
                values = self._wait(future, deadline)
                got = sum(len(v) for v in values if v is not None)
                if got > held:  # a value grew between its size and its read
                    budget.force(got - held)
                    reading[0] = (future, got)
                after = windows[n + 1] if n + 1 < len(windows) else None
                if after is not None and budget.try_acquire(after.bytes):
                    read(after)
                    after = None
                found = sum(1 for v in values if v is not None)
                self.count_get(found, len(values) - found, got)
                for offset, value in enumerate(values):
                    yield w.start + offset, value
                del values
                budget.release(reading.pop(0)[1])
                if after is not None:
                    budget.acquire(after.bytes, deadline)  # holding nothing while waiting
                    try:
                        read(after)
                    except BaseException:
                        budget.release(after.bytes)
                        raise
        finally:
            for future, held in reading:  # abandoned reads give their bytes back once done
                future.cancel()
                future.add_done_callback(lambda _f, held=held: budget.release(held))

    def Put(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> store_pb2.PutResponse:
        deadline = self._deadline(context)
        budget = self.budget
        pending: list[tuple[str, bytes | memoryview]] = []
        pending_bytes = open_bytes = stored = 0
        ttl_s: int | None = None

        def flush() -> None:
            nonlocal pending, pending_bytes, stored
            try:
                stored += self.put_blocks(pending, ttl_s, deadline)
            finally:
                budget.release(pending_bytes)
                pending, pending_bytes = [], 0

        def reserve(size: int) -> None:
            nonlocal open_bytes
            if not budget.try_acquire(size):
                flush()  # never wait for room while holding blocks
                budget.acquire(size, deadline)
            open_bytes = size

        assembler = BlockAssembler(self._limits.max_block_bytes, reserve)
        try:
            for n, message in enumerate(request_iterator):
                for block in assembler.add(message, first=n == 0):
                    ttl_s = assembler.ttl_s or self._default_ttl_s
                    pending.append(block)
                    pending_bytes += open_bytes
                    open_bytes = 0
                    if pending_bytes >= self._limits.batch_bytes or len(pending) >= BATCH_VALUES:
                        flush()
            assembler.finish()
            flush()
        finally:
            budget.release(pending_bytes + open_bytes)
        return store_pb2.PutResponse(stored=stored)

    def put_blocks(
        self, blocks: list[tuple[str, bytes | memoryview]], ttl_s: int | None, deadline: float
    ) -> int:
        """Write checked blocks through the backend (Put, and the data path's Put without a raw
        Redis stream); counted."""
        if not blocks:
            return 0
        stored = self._call(deadline, self._backend.put_many, blocks, ttl_s)
        self.count_put(stored, sum(len(value) for _, value in blocks))
        return stored

    def count_put(self, stored: int, received_bytes: int) -> None:
        self._counts.add(puts=stored)
        self._metrics.puts.inc(stored)
        self._metrics.received_bytes.inc(received_bytes)

    def ttl_for(self, ttl_s: int) -> int | None:
        """A Put's TTL: the one asked for, else the store's --ttl (None: no expiry)."""
        if ttl_s > MAX_TTL_S:
            raise InvalidArgument(
                f"ttl_s {ttl_s} is too long: at most {MAX_TTL_S} seconds (0: the store's default)"
            )
        return ttl_s or self._default_ttl_s

    def close(self) -> None:
        """Stop the backend threads (after the server has finished its calls)."""
        self._io.shutdown(wait=False, cancel_futures=True)

    def Delete(
        self, request: store_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> store_pb2.DeleteResponse:
        check_keys(request.keys, self._limits.max_keys)
        deleted = self._call(self._deadline(context), self._backend.delete, list(request.keys))
        return store_pb2.DeleteResponse(deleted=deleted)

    def Stats(
        self, request: store_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> store_pb2.StatsResponse:
        stats = self._call(self._deadline(context), self._backend.stats)
        counts = self._counts
        return store_pb2.StatsResponse(
            backend=stats.backend,
            keys=stats.keys,
            bytes=stats.bytes,
            capacity_bytes=stats.capacity_bytes,
            hits=counts.hits,
            misses=counts.misses,
            puts=counts.puts,
            evictions=stats.evictions,
            data_port=self.data_port,
        )


def add_to_server(servicer: KVStoreServicer, server: grpc.Server) -> None:
    """Register the servicer like `store_pb2_grpc.add_KVStoreServicer_to_server`, except that
    Get responses and Put requests stay raw bytes, encoded and parsed by `framing`."""
    m = store_pb2
    handlers = {
        "Lookup": grpc.unary_unary_rpc_method_handler(
            servicer.Lookup, m.LookupRequest.FromString, m.LookupResponse.SerializeToString
        ),
        "Get": grpc.unary_stream_rpc_method_handler(servicer.Get, m.GetRequest.FromString, None),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put, None, m.PutResponse.SerializeToString
        ),
        "Delete": grpc.unary_unary_rpc_method_handler(
            servicer.Delete, m.DeleteRequest.FromString, m.DeleteResponse.SerializeToString
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, m.StatsRequest.FromString, m.StatsResponse.SerializeToString
        ),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
