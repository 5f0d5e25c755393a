"""A slow link on loopback, for tests and benchmarks: one TCP port rate-limited in a private
network namespace.

These CPUs prefill so slowly that any store wins; a GPU prefills 100x faster, so there a store
across TCP often loses to recomputing. To show that regime honestly, a scenario runs in its own
network namespace (`unshare -n`, so only loopback exists and nothing else on the machine is
touched), brings `lo` up, and shapes the store's port with `tc`:

    tc qdisc add dev lo root handle 1: htb default 10
    tc class add dev lo parent 1: classid 1:10 htb rate 100gbit     # everything else (Ray)
    tc class add dev lo parent 1: classid 1:20 htb rate <R>mbit     # the store's port
    tc filter add dev lo parent 1: protocol ip u32 match ip sport|dport <port> flowid 1:20

htb rather than a `prio` qdisc with a `tbf` band: the kernels here ship `htb` and `tbf` but not
`prio`; an htb class is a token bucket too, and it lets the filter keep Ray's traffic fast.
Everything set up here dies with the namespace when its process exits.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

FAST_MBIT = 100_000  # "unlimited": far above what loopback carries here
_SHAPED: set[int] = set()


def unavailable() -> str | None:
    """Why a shaped namespace cannot be made here, or None when it can."""
    for tool in ("unshare", "tc", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install util-linux iproute2)"
    if os.geteuid() != 0:
        return "making a network namespace and shaping it needs root"
    probe = subprocess.run(
        ["unshare", "-n", "--", "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"unshare -n / tc htb failed here: {probe.stderr.strip()}"
    return None


_PARENT_NETNS = "KVPOOL_PARENT_NETNS"  # set by run_isolated for the child to compare against


def _netns(path: str = "/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


def in_private_namespace() -> bool:
    """True when this process's network namespace is not the one it was started from.

    The parent's namespace comes from run_isolated (pid 1's may not be readable in a container).
    """
    try:
        parent = os.environ.get(_PARENT_NETNS)
        return _netns() != (int(parent) if parent else _netns("/proc/1/ns/net"))
    except (OSError, ValueError):
        return False


def run_isolated(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a fresh network namespace (its stdout and stderr captured)."""
    env = {**os.environ, _PARENT_NETNS: str(_netns())}
    return subprocess.run(
        ["unshare", "-n", "--", *argv], capture_output=True, text=True, timeout=timeout_s, env=env
    )


def python_isolated(args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`python ...args` in a fresh network namespace, with this interpreter and environment."""
    return run_isolated([sys.executable, *args], timeout_s)


def _tc(*args: str) -> None:
    result = subprocess.run(["tc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {result.stderr.strip()}")


def bring_up_loopback() -> None:
    """`ip link set lo up`, only inside a private namespace (never the machine's loopback)."""
    if not in_private_namespace():
        raise RuntimeError("refusing to configure the machine's loopback: run under unshare -n")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def shape_port(port: int, mbit: float | None, *also: int) -> None:
    """Limit TCP traffic to and from `port` (and the ports in `also`, as one link: a store's
    gRPC port and its data path) on lo to `mbit` Mbit/s (None: unlimited)."""
    if not in_private_namespace():
        raise RuntimeError("refusing to shape the machine's loopback: run under unshare -n")
    rate = f"{mbit if mbit else FAST_MBIT}mbit"
    # A burst of ~10 ms at the rate (at least 32 KB) keeps the average exact at low rates.
    burst = f"{max(32_000, int((mbit or FAST_MBIT) * 1e6 / 8 / 100))}b"
    if not _SHAPED:
        _tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate",
            f"{FAST_MBIT}mbit")  # fmt: skip
    ports = {port, *also}
    if _SHAPED and not ports <= _SHAPED:
        raise RuntimeError(f"ports {sorted(_SHAPED)} are shaped already; one link per namespace")
    if not _SHAPED:
        _tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", rate,
            "burst", burst)  # fmt: skip
        for shaped in sorted(ports):
            for direction in ("sport", "dport"):
                match = ["match", "ip", direction, str(shaped), "0xffff"]
                _tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                    "u32", *match, "flowid", "1:20")  # fmt: skip
        _SHAPED.update(ports)
    else:
        _tc("class", "change", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate",
            rate, "burst", burst)  # fmt: skip


def shape_store(store: Any, mbit: float | None) -> None:
    """Shape a started StoreServer's link: its gRPC port and its data path's, when it has one
    (a Get over the data path bypasses gRPC's port)."""
    data = store.data_port
    shape_port(store.port, mbit, *(() if data is None else (data,)))


def clear_shaping() -> None:
    if _SHAPED:
        _tc("qdisc", "del", "dev", "lo", "root")
        _SHAPED.clear()
