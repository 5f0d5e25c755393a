"""Timing and store-process helpers shared by `kvpool bench store` and its scaling rows."""

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_pair(
    first: Callable[[int], object], second: Callable[[int], object], ops: int
) -> tuple[list[float], list[float]]:
    """Latencies of two operations run alternately (and in alternating order), so both see the
    same machine: on shared, noisy hosts only ratios measured this way mean much."""
    a, b = timed_round([first, second], ops)
    return a, b


def timed_round(each: list[Callable[[int], object]], ops: int) -> list[list[float]]:
    """Latencies of several operations run in turn, the order rotating every round."""
    for op in each:
        op(0)  # warm connections and caches
    times: list[list[float]] = [[] for _ in each]
    for i in range(ops):
        order = list(range(len(each)))
        order = order[i % len(each) :] + order[: i % len(each)]
        if i % 2:
            order.reverse()
        for slot in order:
            start = time.perf_counter()
            each[slot](i)
            times[slot].append(time.perf_counter() - start)
    return times


def summary(latencies: list[float], op_bytes: int) -> dict[str, float]:
    return {
        "gbps": op_bytes * len(latencies) / sum(latencies) / 1e9,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


def start_store(
    redis_url: str, *, processes: int = 1, metrics_port: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    from services.store.redis_process import free_port

    port = free_port()
    env = {**os.environ, "KVPOOL_BACKEND": redis_url, "KVPOOL_PORT": str(port)}
    env |= {"KVPOOL_PROCESSES": str(processes), "KVPOOL_METRICS_PORT": str(metrics_port)}
    cmd = [sys.executable, "-m", "kvpool.cli", "store", "serve", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env)  # the URL travels in env, not in the process list
    return proc, f"127.0.0.1:{port}"


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) that process `pid` has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class CpuMeter:
    """CPU seconds spent by this process (the client) and by the store process during the
    operations it wraps, per phase: `meter.wrap("get", op)` times `op` into phase "get"."""

    def __init__(self, store_pid: int) -> None:
        self.store_pid = store_pid
        self.client_s: dict[str, float] = {}
        self.store_s: dict[str, float] = {}

    def wrap(self, phase: str, op: Callable[[int], object]) -> Callable[[int], object]:
        def measured(i: int) -> object:
            client, store = time.process_time(), process_cpu_s(self.store_pid)
            try:
                return op(i)
            finally:
                self.client_s[phase] = self.client_s.get(phase, 0.0) + time.process_time() - client
                self.store_s[phase] = (
                    self.store_s.get(phase, 0.0) + process_cpu_s(self.store_pid) - store
                )

        return measured


def _steal_s() -> float | None:
    """Seconds the hypervisor kept this machine's CPUs from running it (all CPUs, since boot)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle iowait
    except (OSError, IndexError, ValueError):  # irq softirq steal: not Linux, or no steal field
        return None


def _tcp_retransmits() -> int | None:
    """TCP segments this machine has retransmitted since boot (loopback ones included)."""
    try:
        with open("/proc/net/snmp") as snmp:
            rows = [line.split() for line in snmp if line.startswith("Tcp:")]
        return int(rows[1][rows[0].index("RetransSegs")])
    except (OSError, IndexError, ValueError):
        return None


class HostNoise:
    """What disturbed a run besides itself, from its start to `since()`: CPU time stolen by the
    hypervisor, and TCP retransmissions (this VM's loopback reorders segments under load, and
    every retransmission is a stall). None where the system does not say."""

    def __init__(self) -> None:
        self._steal, self._retransmits = _steal_s(), _tcp_retransmits()

    def since(self) -> dict[str, float | int | None]:
        steal, retransmits = _steal_s(), _tcp_retransmits()
        return {
            "steal_s": (
                None if steal is None or self._steal is None else round(steal - self._steal, 2)
            ),
            "tcp_retransmitted_segments": (
                None if retransmits is None or self._retransmits is None
                else retransmits - self._retransmits
            ),
        }  # fmt: skip
