"""What the fault tests share: the KVStore as a child process that can be killed and restarted on
the same port, and reading Prometheus figures."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.store.redis_process import free_port


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a store with --processes N is a parent and N children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:  # a thread that ended meanwhile
                continue
            todo.extend(int(child) for child in children)
    return found


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP the process and its children for the block (hung, not refused: the kernel still
    accepts connections); SIGCONT always, even when the block fails."""
    pids = process_tree(pid)
    for each in pids:
        os.kill(each, signal.SIGSTOP)
    try:
        yield
    finally:
        for each in pids:
            os.kill(each, signal.SIGCONT)


class StoreProcess:
    """`kvpool store serve` in a child process, on a fixed gRPC port and /metrics port."""

    def __init__(self, backend: str, *extra_args: str) -> None:
        self.backend = backend
        self.extra_args = list(extra_args)  # more `kvpool store serve` flags
        self.port = free_port()
        self.metrics_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "StoreProcess":
        argv = [sys.executable, "-m", "kvpool.cli", "store", "serve", "--backend", self.backend]
        argv += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        argv += ["--grace", "1", "--log-level", "ERROR", *self.extra_args]
        env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
        self._proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"kvpool store serve exited with {self._proc.returncode}")
                try:
                    reply = health.Check(  # our service, not any server on the port
                        health_pb2.HealthCheckRequest(service="kvpool.v1.KVStore"), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError("kvpool store serve did not become SERVING")
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the store is not running")
        return self._proc.pid

    def memory(self) -> tuple[int, int]:
        """(resident bytes now, peak resident bytes) of the store process, from /proc."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * 1024  # kB
        return fields["VmRSS"], fields["VmHWM"]

    def reset_peak(self) -> None:
        """Start the peak resident size (VmHWM) over from the current one (Linux clear_refs)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as clear:
            clear.write("5")

    def kill(self) -> None:
        """SIGKILL: a crash, with no graceful shutdown."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """SIGTERM: the graceful path."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def gateway_metrics(gateway, timeout_s: float = 30.0) -> str:
    """The gateway's registry, worker figures included (pulled from the workers now).

    A worker that misses the collector's 2 s deadline (a busy machine) is absent from a scrape;
    scrape again until every live worker is in it, so sums over workers are complete.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = generate_latest(gateway.metrics.registry).decode()
        reported = {
            sample.labels["worker"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "kvpool_worker_in_flight"
        }
        if reported >= set(gateway.pool.live()) or time.monotonic() > deadline:
            return text


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
