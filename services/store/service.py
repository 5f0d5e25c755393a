"""The KVStore servicer: checks limits, converts from proto, calls the backend, converts back.

It holds no storage logic (that is the backend's) and no wire-format logic (that is `chunks`).
Errors are raised as `kvpool.errors` exceptions; `services.status.ErrorInterceptor` turns them
into status codes.
"""

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from kvpool.v1 import store_pb2, store_pb2_grpc
from services.store.backends import StorageBackend
from services.store.chunks import DEFAULT_CHUNK_BYTES, SERVICE_NAME, BlockAssembler, get_chunks
from services.store.keys import check_keys
from services.store.metrics import StoreMetrics


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What one request may carry, and how values are cut on the wire."""

    max_block_bytes: int = 64 << 20
    max_keys: int = 4096
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Writes reach the backend in batches of about this many bytes: big enough to amortize a
    # round trip, small enough that one call never holds a whole huge request.
    batch_bytes: int = 8 << 20
    # Reads go in windows of about this many bytes; the next window is read while this one is
    # sent, so smaller windows overlap more and larger ones pay fewer round trips.
    window_bytes: int = 2 << 20

    def __post_init__(self) -> None:
        for name in ("max_block_bytes", "max_keys", "chunk_bytes", "batch_bytes", "window_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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
    def __init__(
        self,
        backend: StorageBackend,
        *,
        limits: StoreLimits,
        metrics: StoreMetrics,
        default_ttl_s: int | None = None,
        prefetch_threads: int = 8,
    ) -> None:
        self._backend = backend
        self._limits = limits
        self._metrics = metrics
        self._default_ttl_s = default_ttl_s or None
        self._counts = _Counts()
        self._prefetch = ThreadPoolExecutor(max_workers=prefetch_threads, thread_name_prefix="get")

    def Lookup(
        self, request: store_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> store_pb2.LookupResponse:
        keys = request.keys
        check_keys(keys, self._limits.max_keys)
        present = self._backend.lookup(keys)
        self._metrics.hits.labels("Lookup").inc(present)
        self._metrics.misses.labels("Lookup").inc(len(keys) - present)
        return store_pb2.LookupResponse(present=present)

    def Get(self, request: store_pb2.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        keys = list(request.keys)
        check_keys(keys, self._limits.max_keys)
        yield from get_chunks(self._values(keys), self._limits.chunk_bytes)

    def _values(self, keys: list[str]) -> Iterator[tuple[int, bytes | None]]:
        """Values in request order, read in windows of about `window_bytes`.

        The next window is read from the backend (in the prefetch pool) while this one is being
        sent, so a large Get keeps Redis and the network busy at once. Window sizes follow the
        mean value size seen so far.
        """
        start, window = 0, 2
        ahead = self._prefetch.submit(self._backend.get_many, keys[:window])
        while ahead is not None:
            values = ahead.result()
            found = [v for v in values if v is not None]
            if found:
                mean = sum(len(v) for v in found) // len(found) or 1
                window = max(1, min(256, self._limits.window_bytes // mean))
            after = start + len(values)
            ahead = None
            if after < len(keys):
                ahead = self._prefetch.submit(self._backend.get_many, keys[after : after + window])
            self._counts.add(hits=len(found), misses=len(values) - len(found))
            self._metrics.hits.labels("Get").inc(len(found))
            self._metrics.misses.labels("Get").inc(len(values) - len(found))
            self._metrics.sent_bytes.inc(sum(len(v) for v in found))
            for offset, value in enumerate(values):
                yield start + offset, value
            start = after

    def Put(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> store_pb2.PutResponse:
        assembler = BlockAssembler(self._limits.max_block_bytes)
        pending: list[tuple[str, bytes | memoryview]] = []
        pending_bytes = stored = 0
        for n, message in enumerate(request_iterator):
            for block in assembler.add(message, first=n == 0):
                pending.append(block)
                pending_bytes += len(block[1])
                if pending_bytes >= self._limits.batch_bytes or len(pending) >= 256:
                    stored += self._write(pending, assembler.ttl_s or self._default_ttl_s)
                    pending, pending_bytes = [], 0
        assembler.finish()
        stored += self._write(pending, assembler.ttl_s or self._default_ttl_s)
        return store_pb2.PutResponse(stored=stored)

    def _write(self, blocks: list[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        if not blocks:
            return 0
        stored = self._backend.put_many(blocks, ttl_s)
        self._counts.add(puts=stored)
        self._metrics.puts.inc(stored)
        self._metrics.received_bytes.inc(sum(len(value) for _, value in blocks))
        return stored

    def close(self) -> None:
        """Stop the prefetch threads (after the server has finished its calls)."""
        self._prefetch.shutdown(wait=True, cancel_futures=True)

    def Delete(
        self, request: store_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> store_pb2.DeleteResponse:
        check_keys(request.keys, self._limits.max_keys)
        return store_pb2.DeleteResponse(deleted=self._backend.delete(request.keys))

    def Stats(
        self, request: store_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> store_pb2.StatsResponse:
        stats = self._backend.stats()
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
