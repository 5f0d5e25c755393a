"""Prometheus metrics of one KVStore server (every metric is listed in docs/store.md).

Each `StoreMetrics` has its own registry, so several servers in one process (tests, the embedded
`kvpool serve`) never collide. Backend figures (keys, bytes, evictions) are read from the backend
when Prometheus scrapes, so they cost nothing between scrapes and are never stale.
"""

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvpool.errors import KvpoolError
from services.store.backends import StorageBackend
from services.store.backends.base import BackendStats

# Loopback calls take well under a millisecond; batches of 4 MiB values take tens of ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Sized(Protocol):
    @property
    def used(self) -> int: ...


class _Opens(Protocol):
    on_change: Callable[[bool], None]

    @property
    def is_open(self) -> bool: ...


class _BackendCollector:
    """Reads backend stats at scrape time; a down backend shows as up=0, not a failed scrape.

    A scrape never blocks on the backend: stats are read in a thread of their own and waited for
    at most `wait_s`. A hung backend (a stopped Redis never refuses, it just never answers) shows
    as up=0 at once, and while one read is still stuck no other is started.
    """

    def __init__(self, backend: StorageBackend, wait_s: float = 1.0) -> None:
        self._backend = backend
        self._wait_s = wait_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backend-stats")
        self._reading: Future[BackendStats] | None = None

    def describe(self) -> list[Metric]:
        return []  # without this the registry would call collect (and Redis) at registration

    def _stats(self) -> BackendStats | None:
        if self._reading is None or self._reading.done():
            self._reading = self._pool.submit(self._backend.stats)
        try:
            return self._reading.result(timeout=self._wait_s)
        except (FutureTimeout, KvpoolError):
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kvpool_store_backend_up", "1 when the backend answered stats")
        stats = self._stats()
        if stats is None:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gauges = (
            ("kvpool_store_backend_keys", "keys in the backend", stats.keys),
            ("kvpool_store_backend_bytes", "bytes held by the backend", stats.bytes),
            (
                "kvpool_store_backend_capacity_bytes",
                "the backend's byte bound",
                stats.capacity_bytes,
            ),
        )
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        if stats.evictions is not None:
            yield CounterMetricFamily(
                "kvpool_store_evictions", "keys evicted by the backend for space", stats.evictions
            )
        if stats.dropped is not None:
            yield CounterMetricFamily(
                "kvpool_store_backend_dropped",
                "keys read as misses or writes dropped because their shard failed",
                stats.dropped,
            )


class StoreMetrics:
    """Counters and histograms the servicer updates, plus an optional /metrics endpoint."""

    def __init__(self, backend: StorageBackend | None = None) -> None:
        self.registry = CollectorRegistry()
        self.listening = 0  # 1 while this process's gRPC server serves
        r = self.registry
        self.requests = Counter(
            "kvpool_store_requests", "finished calls", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "kvpool_store_request_seconds",
            "call duration, to the end of the response stream",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "kvpool_store_received_bytes", "value bytes received by Put", registry=r
        )
        self.sent_bytes = Counter("kvpool_store_sent_bytes", "value bytes sent by Get", registry=r)
        self.hits = Counter("kvpool_store_hits", "keys found", ["method"], registry=r)
        self.misses = Counter("kvpool_store_misses", "keys not found", ["method"], registry=r)
        self.puts = Counter("kvpool_store_puts", "blocks written", registry=r)
        self._backend: _BackendCollector | None = None
        if backend is not None:
            self._backend = _BackendCollector(backend)
            r.register(self._backend)
        self._http: object | None = None
        self.port = 0

    def watch(self, budget: _Sized, breaker: _Opens) -> None:
        """Export the servicer's bytes in flight and whether its backend circuit is open.

        Under `--processes N` each child's values go through prometheus_client's multiprocess
        files, which a callback gauge never writes: the circuit's state is set when it changes,
        and the bytes in flight are sampled every half second by a thread of their own.
        """
        inflight = Gauge(
            "kvpool_store_inflight_bytes",
            "value bytes held for calls now (bounded by --max-inflight-bytes)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        circuit = Gauge(
            "kvpool_store_backend_circuit_open",
            "1 while backend calls fail fast after repeated failures",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        circuit.set(float(breaker.is_open))
        breaker.on_change = lambda is_open: circuit.set(float(is_open))
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            inflight.set_function(lambda: budget.used)
            return

        def sample() -> None:
            while True:
                inflight.set(budget.used)
                time.sleep(0.5)

        threading.Thread(target=sample, name="kvpool-store-inflight", daemon=True).start()

    def observe_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """A `services.status.CallObserver`: counts the call and records its latency."""
        short = method.rsplit("/", 1)[-1]
        self.requests.labels(short, code.name).inc()
        self.latency.labels(short).observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on `port` (0 picks a free one); returns the bound port."""
        # The same gauge as the parent of `--processes N` serves: how many store processes
        # listen (here 0 until gRPC serves, then 1), so a waiter reads one figure either way.
        Gauge(
            "kvpool_store_processes",
            "Store processes that listen on the port now",
            registry=self.registry,
        ).set_function(lambda: self.listening)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = server.server_port
        return self.port

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self.close_http()

    def close_http(self) -> None:
        """Stop serving /metrics (if it was served)."""
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]
            self._http = None
