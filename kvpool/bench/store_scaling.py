"""`kvpool bench store --processes 1,2,4 --cluster N`: how the store scales out.

For each backend (one redis-server, and with `--cluster N` a Redis Cluster of N masters, both
started here on loopback) and each process count, a `kvpool store serve --processes P`
subprocess serves the same workload: Put and Get of batches of 1 MiB values through
`StoreClient` (whose Get is split over several streams), next to raw redis-py against the same
servers in the same run (a pipeline of SETs and one MGET on one Redis; redis-py's cluster
pipeline and `mget_nonatomic` on a cluster), alternating operation by operation. Lookup p50/p99
is one call over a 64-block chain, which on a cluster is spread over the shards.

On a 2-core machine the store processes, Redis and the client compete for the same cores, so
the rows show what that machine does, not the scaling a bigger one gets from the same command.
"""

import argparse
import os
import statistics
import time
import urllib.request
from typing import Any

from kvpool.bench.store_timing import percentile, start_store, summary, timed_pair

VALUE_BYTES = 1 << 20
BATCH_VALUES = 16  # 16 MiB per operation: a Get big enough to be split over 4 streams


def parse_processes(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 1 or n > 64 for n in counts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give process counts from 1 to 64, separated by commas (e.g. 1,2,4)"
        )
    return counts


def _wait_serving(metrics_port: int, processes: int, timeout_s: float = 120.0) -> None:
    """Until the parent's /metrics says every store process listens."""
    deadline = time.monotonic() + timeout_s
    want = f"kvpool_store_processes {float(processes)}"
    while True:
        try:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            if want in urllib.request.urlopen(url, timeout=2).read().decode().splitlines():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("kvpool store serve did not start its processes") from None
        time.sleep(0.2)


def _measure(raw: Any, cluster: bool, client: Any, args: argparse.Namespace) -> dict[str, Any]:
    value = os.urandom(VALUE_BYTES)
    ops = max(8, (args.mib << 20) // (BATCH_VALUES * VALUE_BYTES))
    raw_keys = [[f"kvpool:bench:raw:{op}:{i}" for i in range(BATCH_VALUES)] for op in range(ops)]
    svc_keys = [[f"kvpool:bench:svc:{op}:{i}" for i in range(BATCH_VALUES)] for op in range(ops)]

    def raw_put(op: int) -> None:
        pipe = raw.pipeline(transaction=False) if not cluster else raw.pipeline()
        for key in raw_keys[op]:
            pipe.set(key, value)
        pipe.execute()

    def raw_get(op: int) -> None:
        values = raw.mget_nonatomic(raw_keys[op]) if cluster else raw.mget(raw_keys[op])
        if any(v is None for v in values):
            raise RuntimeError("raw GET missed a key it had just written (is Redis too small?)")

    def svc_put(op: int) -> None:
        client.put_many([(key, value) for key in svc_keys[op]])

    def svc_get(op: int) -> None:
        if len(client.get_many(svc_keys[op])) != BATCH_VALUES:
            raise RuntimeError("the store missed a key it had just written (is Redis too small?)")

    op_bytes = BATCH_VALUES * VALUE_BYTES
    put_times, set_times = timed_pair(svc_put, raw_put, ops)
    get_times, mget_times = timed_pair(svc_get, raw_get, ops)
    put, redis_set = summary(put_times, op_bytes), summary(set_times, op_bytes)
    get, redis_get = summary(get_times, op_bytes), summary(mget_times, op_bytes)

    chain = [f"kvpool:blk:{i:064x}" for i in range(args.chain)]
    client.put_many([(key, b"x" * 64) for key in chain])

    def svc_lookup(_: int) -> None:
        if client.lookup(chain) != len(chain):
            raise RuntimeError("Lookup did not find the whole chain")

    def raw_lookup(_: int) -> None:
        pipe = raw.pipeline(transaction=False) if not cluster else raw.pipeline()
        for key in chain:
            pipe.exists(key)
        pipe.execute()

    lookups, raw_lookups = timed_pair(svc_lookup, raw_lookup, args.lookups)
    return {
        "value_bytes": VALUE_BYTES,
        "batch_values": BATCH_VALUES,
        "ops": ops,
        "put_gbps": round(put["gbps"], 3),
        "get_gbps": round(get["gbps"], 3),
        "redis_set_gbps": round(redis_set["gbps"], 3),
        "redis_get_gbps": round(redis_get["gbps"], 3),
        "get_p50_ms": round(get["p50_ms"], 3),
        "put_p50_ms": round(put["p50_ms"], 3),
        "lookup_chain": args.chain,
        "lookup_p50_ms": round(statistics.median(lookups) * 1e3, 3),
        "lookup_p99_ms": round(percentile(lookups, 0.99) * 1e3, 3),
        "redis_lookup_p50_ms": round(statistics.median(raw_lookups) * 1e3, 3),
    }


def _backends(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, started server object) for one Redis and, with --cluster, a cluster."""
    from services.store.redis_cluster_process import RedisClusterProcess
    from services.store.redis_process import RedisProcess

    started: list[tuple[str, Any]] = [("redis", RedisProcess(maxmemory_bytes=2 << 30).start())]
    if args.cluster:
        per_node = max(256 << 20, (2 << 30) // args.cluster)
        cluster = RedisClusterProcess(args.cluster, replicas=0, maxmemory_bytes=per_node)
        started.append((f"cluster-{args.cluster}", cluster.start()))
    return started


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from services.store.client import StoreClient
    from services.store.redis_process import free_port

    rows = []
    backends = _backends(args)
    try:
        for name, server in backends:
            cluster = name.startswith("cluster")
            if cluster:
                raw = redis.RedisCluster(host="127.0.0.1", port=server.master_ports()[0])
            else:
                raw = redis.Redis.from_url(server.url)
            try:
                for processes in args.processes or [1]:
                    metrics_port = free_port()
                    store, target = start_store(
                        server.url, processes=processes, metrics_port=metrics_port
                    )
                    try:
                        _wait_serving(metrics_port, processes)
                        with StoreClient(target, timeout_s=60) as client:
                            row = {"backend": name, "processes": processes}
                            row |= _measure(raw, cluster, client, args)
                    finally:
                        store.terminate()
                        store.wait(60)
                    if cluster:
                        server.flushall()
                    else:
                        raw.flushdb()
                    rows.append(row)
                    print(row, flush=True)
            finally:
                raw.close()
    finally:
        for _, server in backends:
            server.close()
    return {"scaling": rows}


def plot_scaling(result: dict[str, Any], path: Any) -> None:
    from kvpool.bench.report import figure, save_plot

    rows = result["scaling"]
    fig, axes = figure(ncols=2, size=(5.5, 4.0))
    left, right = axes[0]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        xs = [r["processes"] for r in mine]
        left.plot(xs, [r["get_gbps"] for r in mine], marker="o", label=f"{backend}: get")
        left.plot(xs, [r["put_gbps"] for r in mine], marker="s", label=f"{backend}: put")
        left.plot(xs, [r["redis_get_gbps"] for r in mine], linestyle=":", marker=".",
                  label=f"{backend}: redis-py GET, same row")  # fmt: skip
        right.plot(xs, [r["lookup_p50_ms"] for r in mine], marker="o", label=f"{backend} p50")
        right.plot(xs, [r["lookup_p99_ms"] for r in mine], marker="^", label=f"{backend} p99")
    counts = sorted({r["processes"] for r in rows})
    left.set_xticks(counts)
    right.set_xticks(counts)
    left.set_xlabel("store processes")
    left.set_ylabel("GB/s (1 MiB values, 16 per call)")
    left.legend(fontsize=7)
    right.set_xlabel("store processes")
    right.set_ylabel(f"Lookup of {rows[0]['lookup_chain']} keys, ms")
    right.legend(fontsize=7)
    save_plot(path, fig)
