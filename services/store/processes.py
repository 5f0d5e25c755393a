"""`kvpool store serve --processes N`: N store processes on one port, under one parent.

One store process serves every call under one interpreter lock, so it tops out at about one
core. The store keeps no state of its own (every block is in Redis; the counters of `Stats` are
per process and only informational), so any number of identical processes can serve the same
port: each binds it with `SO_REUSEPORT` (gRPC's `grpc.so_reuseport`) and the kernel spreads new
connections over them. Each process has its own Redis connections. With the memory backend each
process would have a cache of its own, so more than one process needs Redis.

The parent serves no calls. It starts the children (spawned, never forked: gRPC and fork do not
mix), waits until each is listening, forwards SIGTERM/SIGINT to them, restarts a child that dies
(backing off when one keeps dying at once), and serves the one `/metrics` of the whole store:
the children write their counters to a shared folder (prometheus_client's multiprocess mode),
the parent adds them up at scrape time and reads the backend's figures itself.

This module imports no grpc or prometheus_client at load time: a spawned child must switch
prometheus_client to multiprocess mode before any metric exists.
"""

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvpool.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from services.store.server import StoreConfig

log = logging.getLogger(__name__)

MAX_PROCESSES = 64
AUTO_MAX_PROCESSES = 8


@dataclass(frozen=True, slots=True)
class Supervision:
    """How many store processes, and how the parent restarts them."""

    processes: int = 0  # 0: one per usable core, at most 8, with Redis; 1 with memory
    start_timeout_s: float = 60.0  # a child that is not listening by then failed to start
    restart_backoff_s: float = 0.5  # first wait before restarting a child that died at once
    max_restart_backoff_s: float = 10.0
    stable_after_s: float = 10.0  # a child that lived this long resets the backoff

    def __post_init__(self) -> None:
        if not 0 <= self.processes <= MAX_PROCESSES:
            raise InvalidArgument(
                f"processes must be 0 (auto) to {MAX_PROCESSES}, got {self.processes}"
            )


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota.

    `os.cpu_count()` is the node's count; a container limited to 2 CPUs on a 64-core node
    would otherwise start 8 processes that share 2 CPUs (and 8 times the memory).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity stands
    return cores


def process_count(requested: int, backend: str) -> int:
    """The number of store processes to run for `requested` (0: auto) and this backend."""
    if requested < 0 or requested > MAX_PROCESSES:
        raise InvalidArgument(f"--processes must be 0 (auto) to {MAX_PROCESSES}, got {requested}")
    if backend == "memory":
        if requested > 1:
            raise InvalidArgument(
                f"--processes {requested} needs a shared backend (redis://, rediss://, unix://, "
                "redis+cluster://): with 'memory' each process would keep a cache of its own"
            )
        return 1
    if requested == 0:
        return max(1, min(available_cores(), AUTO_MAX_PROCESSES))
    return requested


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the parent dies, as one store process dies with SIGKILL.

    Linux's PR_SET_PDEATHSIG fires when the parent *thread* that started the child ends, which
    is why the supervisor's threads that spawn children outlive them.
    """
    if sys.platform == "linux":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)


def _child_main(
    config: "StoreConfig",
    index: int,
    ready: multiprocessing.connection.Connection,
    metrics_dir: str,
    log_level: str,
    parent_pid: int,
) -> None:
    """One store process: serve until SIGTERM/SIGINT (or until the parent is gone)."""
    _die_with_parent(parent_pid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()  # before any metric is created
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s store[{index}] %(name)s: %(message)s",
    )
    from services.store.malloc import tune_malloc

    tune_malloc()
    from services.grpc_server import run_until_signal
    from services.store.server import StoreServer

    try:
        server = StoreServer(replace(config, reuse_port=True, metrics_port=0))
        port = server.start()
    except Exception as exc:  # reported to the parent, which decides what to do
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    ready.send(("ready", port))
    ready.close()
    run_until_signal(server.stop)


def serve_supervised(supervisor: "StoreSupervisor") -> None:
    """Start `supervisor`, serve until SIGTERM or SIGINT, then stop every child.

    The handlers go in before the children start: starting N processes takes seconds, and a
    signal in that window must still stop them all instead of killing only the parent.
    """
    received = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; stopping the store processes", signal.Signals(signum).name)
        received.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        supervisor.start()
        while not received.wait(0.5):  # a timed wait lets the handlers run
            pass
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(slots=True)
class _Child:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    started_at: float


class StoreSupervisor:
    """N StoreServer processes on one port, restarted when they die, with one /metrics.

    supervisor = StoreSupervisor(StoreConfig(backend="redis://...", port=50052), processes=4)
    port = supervisor.start()      # every child is listening when this returns
    supervisor.pids()              # the children now
    supervisor.stop()              # SIGTERM to each child, which finishes its calls (grace_s)
    """

    def __init__(
        self,
        config: "StoreConfig",
        processes: int,
        *,
        supervision: Supervision | None = None,
        log_level: str = "INFO",
    ) -> None:
        if processes < 1:
            raise InvalidArgument(f"processes must be at least 1, got {processes}")
        self.config = config
        self.processes = processes
        self._supervision = supervision or Supervision()
        self._log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._children_gone = threading.Event()  # the monitor (a spawning thread) ends after
        self._monitor: threading.Thread | None = None
        self._metrics_dir = ""
        self._metrics_http: Any = None
        self._backend: Any = None
        self.registry: Any = None  # the parent's Prometheus registry (children's sums)
        self.port = config.port
        self.metrics_port = 0
        self.restarts = 0

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def pids(self) -> list[int]:
        with self._lock:
            return [child.process.pid for child in self._children if child.process.is_alive()]

    def start(self) -> int:
        """Start every child and the metrics endpoint; returns the shared port."""
        if self.port == 0:  # every child must bind the same port: pick it here
            from services.store.redis_process import free_port

            self.port = free_port()
        self.config = replace(self.config, port=self.port)
        self._metrics_dir = tempfile.mkdtemp(prefix="kvpool-store-metrics-")
        try:
            # /metrics first: it must answer once the first child's health says SERVING, and
            # must not wait on the backend (a hung Redis would hold it). Its
            # kvpool_store_processes gauge says how many children listen.
            self._start_metrics()
            for index in range(self.processes):
                self._children.append(self._spawn(index))
        except BaseException:
            self.stop(grace_s=0)
            raise
        self._monitor = threading.Thread(target=self._watch, name="store-supervisor", daemon=True)
        self._monitor.start()
        log.info(
            "KVStore: %d processes on %s:%d (pids %s)",
            self.processes, self.config.host, self.port, self.pids(),
        )  # fmt: skip
        return self.port

    def _spawn(self, index: int) -> _Child:
        """Start child `index` and wait until it listens; Unavailable if it cannot."""
        parent_end, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main,
            args=(
                self.config, index, child_end, self._metrics_dir, self._log_level, os.getpid()
            ),
            name=f"kvpool-store-{index}",
        )  # fmt: skip
        process.start()
        child_end.close()
        try:
            if not parent_end.poll(self._supervision.start_timeout_s):
                process.kill()
                process.join()
                raise Unavailable(f"store process {index} did not start listening in time")
            try:
                status, detail = parent_end.recv()
            except EOFError:
                process.join(5)
                raise Unavailable(
                    f"store process {index} exited with status {process.exitcode} at start"
                ) from None
        finally:
            parent_end.close()
        if status != "ready":
            process.join(5)
            raise Unavailable(f"store process {index} could not start: {detail}")
        return _Child(index, process, time.monotonic())

    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        from services.store.backends import open_backend
        from services.store.metrics import _BackendCollector

        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=self._metrics_dir)
        # The parent reads the backend's figures (keys, bytes, evictions) itself, once per
        # scrape, instead of adding up N copies of the same Redis's numbers.
        self._backend = open_backend(
            self.config.backend,
            max_memory_bytes=self.config.max_memory_bytes,
            redis_password=self.config.redis_password,
        )
        self.registry.register(_BackendCollector(self._backend))
        Gauge(
            "kvpool_store_processes",
            "Store processes that listen on the port now (the parent's children)",
            registry=self.registry,
        ).set_function(lambda: len(self.pids()))
        if self.config.metrics_port:
            server, _thread = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=self.registry
            )
            self._metrics_http = server
            self.metrics_port = server.server_port

    def _watch(self) -> None:
        """Restart children that die while the store is not stopping."""
        backoff = self._supervision.restart_backoff_s
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {child.process.sentinel: child for child in self._children}
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                child = sentinels[sentinel]  # type: ignore[index]
                child.process.join()
                if self._stopping.is_set():
                    break
                lived = time.monotonic() - child.started_at
                if lived >= self._supervision.stable_after_s:
                    backoff = self._supervision.restart_backoff_s
                log.warning(
                    "store process %d (pid %d) exited with status %s after %.1f s; restarting "
                    "it in %.1f s",
                    child.index, child.process.pid, child.process.exitcode, lived, backoff,
                )  # fmt: skip
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, self._supervision.max_restart_backoff_s)
                try:
                    replacement = self._spawn(child.index)
                except Unavailable as exc:
                    log.error("%s; trying again", exc)
                    continue  # its sentinel is still ready: the next wait retries at once
                with self._lock:
                    self._children[self._children.index(child)] = replacement
                    self.restarts += 1
                log.info("store process %d is back (pid %d)", child.index, replacement.process.pid)
        # Children this thread spawned die with it (PR_SET_PDEATHSIG): outlive them.
        self._children_gone.wait()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child (they finish in-flight calls within grace), then clean up."""
        self._stopping.set()
        grace = self.config.grace_s if grace_s is None else grace_s
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.process.is_alive():
                child.process.terminate()  # SIGTERM: the child's graceful stop
        deadline = time.monotonic() + grace + 5.0
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("store process %d did not stop in time; killing it", child.index)
                child.process.kill()
                child.process.join()
        self._children_gone.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = ""

    def __enter__(self) -> "StoreSupervisor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
