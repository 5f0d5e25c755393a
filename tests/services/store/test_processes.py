"""`--processes N`: store processes sharing one port, supervised, with one /metrics.

Real child processes (spawned), a real redis-server, real gRPC clients on loopback.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvpool.errors import InvalidArgument
from services.store.client import StoreClient
from services.store.processes import (
    AUTO_MAX_PROCESSES,
    StoreSupervisor,
    available_cores,
    process_count,
)
from services.store.server import StoreConfig

pytestmark = pytest.mark.integration


def _wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout_s} s")
        time.sleep(0.05)


def _puts_seen_by_fresh_connections(target: str, connections: int) -> list[int]:
    """Each fresh client (its own TCP connection) puts one block and reads its process's count.

    A Put and the Stats after it travel on one connection, so they reach the same process, and
    `puts` in Stats counts that process's Puts only: each process's first answer is 1.
    """
    seen = []
    for n in range(connections):
        with StoreClient(target, timeout_s=5) as client:
            client.put_many([(f"kvpool:blk:{n:064x}", b"v")])
            seen.append(client.stats().puts)
    return seen


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_two_processes_on_one_port_both_serve_with_one_metrics(redis_server, free_port):
    config = StoreConfig(backend=redis_server, port=0, grace_s=1, metrics_port=free_port())
    with StoreSupervisor(config, 2) as supervisor:
        assert len(supervisor.pids()) == 2
        seen = _puts_seen_by_fresh_connections(supervisor.target, 24)
        # Two processes answered: each one's first Put reports 1 (all on one would be 1..24).
        assert seen.count(1) == 2, seen
        url = f"http://127.0.0.1:{supervisor.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    # The parent adds up both children's counters, and reads the backend itself.
    assert _metric(text, 'kvpool_store_requests_total{code="OK",method="Put"}') == 24
    assert _metric(text, "kvpool_store_puts_total") == 24
    assert _metric(text, "kvpool_store_backend_up") == 1
    assert _metric(text, "kvpool_store_backend_keys") == 24


def test_metrics_answer_before_the_first_child_serves(redis_server, free_port, monkeypatch):
    """Issue 23's CI flake: a caller that waited for the first child's health to say SERVING
    and then scraped found /metrics refusing connections, bound only after every child (and,
    with Redis hung, not at all). Now it is bound first and counts the listening children."""
    config = StoreConfig(backend=redis_server, port=0, grace_s=1, metrics_port=free_port())
    supervisor = StoreSupervisor(config, 2)
    scraped = []
    spawn = supervisor._spawn

    def spawn_after_a_scrape(index: int):
        url = f"http://127.0.0.1:{config.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            scraped.append(_metric(response.read().decode(), "kvpool_store_processes "))
        return spawn(index)

    monkeypatch.setattr(supervisor, "_spawn", spawn_after_a_scrape)
    with supervisor:
        url = f"http://127.0.0.1:{supervisor.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert scraped == [0, 1]  # answering before each child, counting those that listen
    assert _metric(text, "kvpool_store_processes ") == 2


def test_a_killed_child_is_replaced_and_the_port_keeps_serving(redis_server):
    config = StoreConfig(backend=redis_server, port=0, grace_s=1)
    with StoreSupervisor(config, 2) as supervisor:
        victim, survivor = supervisor.pids()
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: victim not in supervisor.pids() and len(supervisor.pids()) == 2,
                  what="a replacement child")  # fmt: skip
        assert survivor in supervisor.pids() and supervisor.restarts == 1
        seen = _puts_seen_by_fresh_connections(supervisor.target, 24)
        assert seen.count(1) == 2, seen  # the survivor and the replacement (which starts at 0)
        assert len(seen) == 24


def _children(pid: int) -> set[int]:
    """The store processes of the parent `pid` (not multiprocessing's resource tracker)."""
    found: set[int] = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in path.read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:  # gone already
                continue
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; it is only waiting for its parent.
    status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
    return "State:\tZ" not in status


def test_cli_forwards_sigterm_to_every_process_and_exits_zero(redis_server, free_port):
    port = free_port()
    env = {**os.environ, "KVPOOL_PORT": str(port), "KVPOOL_BACKEND": redis_server}
    env |= {"KVPOOL_GRACE": "1", "KVPOOL_PROCESSES": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpool.cli", "store", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as client:
            client.wait_ready(60)
            assert client.put_many([("kvpool:sess:a", b"1")]) == 1
        _wait_for(lambda: len(_children(proc.pid)) >= 2, what="two children")
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "2 processes" in stderr and "SIGTERM" in stderr
    assert not any(_alive(pid) for pid in children)


@pytest.mark.parametrize(
    "argv", [["store", "serve", "--processes", "2"], ["serve", "--store-processes", "2"]]
)
def test_memory_backend_with_several_processes_is_a_usage_error(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "needs a shared backend" in proc.stderr and "Traceback" not in proc.stderr


def test_process_count():
    assert process_count(0, "memory") == 1
    assert process_count(1, "memory") == 1
    auto = process_count(0, "redis://r:6379/0")
    assert auto == min(available_cores(), AUTO_MAX_PROCESSES)
    assert process_count(3, "redis+cluster://r:7000") == 3
    for bad in (-1, 65):
        with pytest.raises(InvalidArgument, match="0 \\(auto\\) to 64"):
            process_count(bad, "redis://r:6379/0")


def test_children_die_with_a_parent_killed_outright(redis_server, free_port):
    """SIGKILL on the parent stops the whole store at once, as it stops one store process."""
    port = free_port()
    env = {**os.environ, "KVPOOL_PORT": str(port), "KVPOOL_BACKEND": redis_server}
    env |= {"KVPOOL_PROCESSES": "2", "KVPOOL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "kvpool.cli", "store", "serve"], env=env)
    try:
        with StoreClient(f"127.0.0.1:{port}", timeout_s=5) as client:
            client.wait_ready(60)
        _wait_for(lambda: len(_children(proc.pid)) >= 2, what="two children")
        children = _children(proc.pid)
        proc.kill()
        proc.wait(10)
        _wait_for(lambda: not any(_alive(pid) for pid in children), 5, "children gone")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_available_cores_follow_a_cgroup_cpu_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    cpu_max.write_text("max 100000\n")  # no quota
    assert available_cores(cpu_max) == affinity
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: 2 processes can use them
    assert available_cores(cpu_max) == min(affinity, 2)
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one process
    assert available_cores(cpu_max) == 1
    assert available_cores(tmp_path / "absent") == affinity
