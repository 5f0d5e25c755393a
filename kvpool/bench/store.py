"""`kvpool bench store`: KVStore throughput and latency against raw redis-py, in one run.

For each value size, the same batches of values go (a) through the KVStore gRPC service (a
`kvpool store serve` subprocess, as in production) with `StoreClient.put_many` / `get_many`, and
(b) straight to the same redis-server with redis-py (a pipeline of SETs, one MGET): the limit on
this box; and (c) the same MGETs through a relay that only forwards bytes (`store_relay`), which
prices the one hop a store adds. One operation moves one batch of about `--batch-bytes`.
Throughput is bytes over the total time of the operations, latency is per operation. Without
`--redis` the benchmark starts its own redis-server on a free loopback port (maxmemory 2 GiB,
allkeys-lru, no persistence).

With `--processes 1,2,4` and/or `--cluster N` it measures how the store scales out instead
(`kvpool/bench/store_scaling.py`): rows per backend and process count.
"""

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvpool.bench.store_relay import SpliceRelay
from kvpool.bench.store_timing import (
    CpuMeter,
    HostNoise,
    percentile,
    start_store,
    summary,
    timed_round,
)

SIZES = (64 << 10, 1 << 20, 4 << 20)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, required=True, help="write results here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--redis", help="use this Redis URL instead of starting a redis-server")
    parser.add_argument("--mib", type=int, default=256, help="MiB moved per size and phase")
    parser.add_argument(
        "--sizes",
        type=_sizes_kib,
        default=[size >> 10 for size in SIZES],
        metavar="KIB,...",
        help="value sizes in KiB, e.g. 64,1024 (default 64,1024,4096)",
    )
    parser.add_argument("--batch-bytes", type=int, default=4 << 20, help="bytes per operation")
    parser.add_argument("--chain", type=int, default=64, help="keys in the Lookup chain")
    parser.add_argument("--lookups", type=int, default=500, help="Lookup calls timed")
    parser.add_argument(
        "--processes",
        type=_process_counts,
        help="scaling rows: run the store with each of these process counts, e.g. 1,2,4",
    )
    parser.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="scaling rows also on a Redis Cluster of N masters (N >= 3) started here",
    )
    parser.add_argument(
        "--clients",
        type=_process_counts,
        default=[1, 2, 4],
        help="aggregate Get rows with this many client processes at once (default 1,2,4)",
    )
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="apply the store server's malloc settings to this process too (client and raw "
        "redis-py alike; both get faster)",
    )


def _sizes_kib(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(not 1 <= size <= 64 << 10 for size in sizes):
        raise argparse.ArgumentTypeError(
            f"--sizes takes value sizes in KiB from 1 to 65536, comma-separated; got {text!r}"
        )
    return sizes


def _process_counts(text: str) -> list[int]:
    from kvpool.bench.store_scaling import parse_processes

    return parse_processes(text)


def _measure_size(
    raw: object,
    client: object,
    grpc_client: object,
    size: int,
    args: argparse.Namespace,
    store_pid: int,
    relayed: object,
) -> dict:
    batch = max(1, args.batch_bytes // size)
    ops = max(8, (args.mib << 20) // (batch * size))
    value = os.urandom(size)
    raw_keys = [[f"bench:raw:{size}:{op}:{i}" for i in range(batch)] for op in range(ops)]
    svc_keys = [[f"bench:svc:{size}:{op}:{i}" for i in range(batch)] for op in range(ops)]

    def raw_put(op: int) -> None:
        pipe = raw.pipeline(transaction=False)  # type: ignore[attr-defined]
        for key in raw_keys[op]:
            pipe.set(key, value)
        pipe.execute()

    def raw_get(op: int) -> None:
        values = raw.mget(raw_keys[op])  # type: ignore[attr-defined]
        if any(v is None for v in values):
            raise RuntimeError("raw GET missed a key it had just written (is Redis too small?)")

    def svc_put(op: int) -> None:
        client.put_many([(key, value) for key in svc_keys[op]])  # type: ignore[attr-defined]

    def grpc_put(op: int) -> None:  # the same Put with the data path off: gRPC only
        grpc_client.put_many([(key, value) for key in svc_keys[op]])  # type: ignore[attr-defined]

    def svc_get(op: int) -> None:
        got = client.get_many(svc_keys[op])  # type: ignore[attr-defined]
        if len(got) != batch:
            raise RuntimeError("the store missed a key it had just written (is Redis too small?)")

    def relayed_get(op: int) -> None:  # raw redis-py through a relay: one more hop, nothing else
        if any(v is None for v in relayed.mget(raw_keys[op])):  # type: ignore[attr-defined]
            raise RuntimeError("raw GET through the relay missed a key it had just written")

    def grpc_get(op: int) -> None:  # the same Get with the data path off: gRPC only
        if len(grpc_client.get_many(svc_keys[op])) != batch:  # type: ignore[attr-defined]
            raise RuntimeError("the store missed a key it had just written (is Redis too small?)")

    op_bytes = batch * size
    cpu = CpuMeter(store_pid)
    put_times, grpc_put_times, set_times = timed_round(
        [cpu.wrap("put", svc_put), cpu.wrap("grpc_put", grpc_put), cpu.wrap("redis_set", raw_put)],
        ops,
    )
    gets = [svc_get, grpc_get, raw_get] + ([relayed_get] if relayed is not None else [])
    names = ("get", "grpc_get", "redis_get", "relayed_get")
    get_times, grpc_times, mget_times, *relayed_times = timed_round(
        [cpu.wrap(name, op) for name, op in zip(names, gets, strict=False)], ops
    )
    gb = op_bytes * (ops + 1) / 1e9  # timed_round's warm-up op is measured too

    def per_gb(seconds: dict[str, float], phase: str) -> float:
        return round(seconds[phase] / gb, 3)

    put, redis_set = summary(put_times, op_bytes), summary(set_times, op_bytes)
    grpc_put_ = summary(grpc_put_times, op_bytes)
    get, redis_get = summary(get_times, op_bytes), summary(mget_times, op_bytes)
    grpc_get_ = summary(grpc_times, op_bytes)
    relayed_get_ = summary(relayed_times[0], op_bytes) if relayed_times else None
    raw.flushdb()  # type: ignore[attr-defined]
    if relayed_get_ is not None:
        # Raw redis-py GET through a byte relay (store_relay): what one more hop alone costs,
        # the ceiling of get_ratio for anything between the client and Redis.
        hop = {
            "relayed_get_gbps": round(relayed_get_["gbps"], 3),
            "relayed_get_ratio": round(relayed_get_["gbps"] / redis_get["gbps"], 3),
        }
    else:
        hop = {}
    return {
        "value_bytes": size,
        "batch_values": batch,
        "ops": ops,
        "put_gbps": round(put["gbps"], 3),
        "get_gbps": round(get["gbps"], 3),
        "redis_set_gbps": round(redis_set["gbps"], 3),
        "redis_get_gbps": round(redis_get["gbps"], 3),
        "put_ratio": round(put["gbps"] / redis_set["gbps"], 3),
        "get_ratio": round(get["gbps"] / redis_get["gbps"], 3),
        # get_* is StoreClient's default (the data path when the store offers it); grpc_get_*
        # is the same Get through gRPC only, in the same rounds.
        "grpc_get_gbps": round(grpc_get_["gbps"], 3),
        "grpc_get_ratio": round(grpc_get_["gbps"] / redis_get["gbps"], 3),
        "grpc_get_p50_ms": round(grpc_get_["p50_ms"], 3),
        "grpc_put_gbps": round(grpc_put_["gbps"], 3),  # put_* likewise: the data path's Put
        "grpc_put_ratio": round(grpc_put_["gbps"] / redis_set["gbps"], 3),
        "grpc_put_client_cpu_s_per_gb": per_gb(cpu.client_s, "grpc_put"),
        "grpc_put_store_cpu_s_per_gb": per_gb(cpu.store_s, "grpc_put"),
        "put_p50_ms": round(put["p50_ms"], 3),
        "get_p50_ms": round(get["p50_ms"], 3),
        "put_p99_ms": round(put["p99_ms"], 3),
        "get_p99_ms": round(get["p99_ms"], 3),
        "redis_set_p99_ms": round(redis_set["p99_ms"], 3),
        "redis_get_p99_ms": round(redis_get["p99_ms"], 3),
        # CPU seconds per GB moved: this process (the client) and the store process.
        "get_client_cpu_s_per_gb": per_gb(cpu.client_s, "get"),
        "get_store_cpu_s_per_gb": per_gb(cpu.store_s, "get"),
        "grpc_get_client_cpu_s_per_gb": per_gb(cpu.client_s, "grpc_get"),
        "grpc_get_store_cpu_s_per_gb": per_gb(cpu.store_s, "grpc_get"),
        "put_client_cpu_s_per_gb": per_gb(cpu.client_s, "put"),
        "put_store_cpu_s_per_gb": per_gb(cpu.store_s, "put"),
        "redis_get_client_cpu_s_per_gb": per_gb(cpu.client_s, "redis_get"),
        "redis_set_client_cpu_s_per_gb": per_gb(cpu.client_s, "redis_set"),
        **hop,
    }


def _relayed_client(url: str) -> "tuple[SpliceRelay | None, Any]":
    """A redis-py client that reaches `url` through a byte relay (TCP Redis only; else None)."""
    import redis

    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None, None
    relay = SpliceRelay(parts.hostname or "127.0.0.1", parts.port or 6379)
    client = redis.Redis(
        host="127.0.0.1", port=relay.port, db=int((parts.path or "/0").strip("/") or 0),
        username=parts.username, password=parts.password,
    )  # fmt: skip
    return relay, client


def _measure_lookup(
    raw: object, client: object, grpc_client: object, args: argparse.Namespace
) -> dict[str, float]:
    chain = [f"kvpool:blk:{i:064x}" for i in range(args.chain)]
    client.put_many([(key, b"x" * 64) for key in chain])  # type: ignore[attr-defined]

    def svc_lookup(_: int) -> None:
        if client.lookup(chain) != len(chain):  # type: ignore[attr-defined]
            raise RuntimeError("Lookup did not find the whole chain")

    def grpc_lookup(_: int) -> None:
        if grpc_client.lookup(chain) != len(chain):  # type: ignore[attr-defined]
            raise RuntimeError("Lookup did not find the whole chain")

    def raw_lookup(_: int) -> None:
        pipe = raw.pipeline(transaction=False)  # type: ignore[attr-defined]
        for key in chain:
            pipe.exists(key)
        pipe.execute()

    svc, via_grpc, direct = timed_round([svc_lookup, grpc_lookup, raw_lookup], args.lookups)
    raw.flushdb()  # type: ignore[attr-defined]
    return {
        "lookup_chain": args.chain,
        "lookup_p50_ms": round(statistics.median(svc) * 1e3, 3),
        "lookup_p99_ms": round(percentile(svc, 0.99) * 1e3, 3),
        "grpc_lookup_p50_ms": round(statistics.median(via_grpc) * 1e3, 3),
        "redis_lookup_p50_ms": round(statistics.median(direct) * 1e3, 3),
    }


def _plot(result: dict, path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    rows = result["rows"]
    labels = [f"{r['value_bytes'] >> 10} KiB" for r in rows]
    series = (
        ("put_gbps", "KVStore put (data path)"),
        ("grpc_put_gbps", "KVStore put (gRPC)"),
        ("redis_set_gbps", "redis-py SET"),
        ("get_gbps", "KVStore get (data path)"),
        ("grpc_get_gbps", "KVStore get (gRPC)"),
        ("redis_get_gbps", "redis-py GET"),
    )
    fig, axes = figure(ncols=2, size=(5.5, 4.0))
    left, right = axes[0]
    width = 0.13
    for n, (key, name) in enumerate(series):
        xs = [i + (n - 2.5) * width for i in range(len(rows))]
        left.bar(xs, [r[key] for r in rows], width, label=name)
    left.set_xticks(range(len(rows)), labels)
    left.set_ylabel("GB/s")
    left.set_title("Throughput by value size (batches of ~4 MiB)", fontsize=9)
    left.legend(fontsize=8)
    ratios = (("put_ratio", "put / SET (data path)"), ("get_ratio", "get / GET (data path)"))
    grpc = (("grpc_put_ratio", "put / SET (gRPC)"), ("grpc_get_ratio", "get / GET (gRPC)"))
    hop = (("relayed_get_ratio", "GET through a byte relay / GET (one hop's cost)"),)
    for key, name in (*ratios, *grpc, *hop):
        if key not in rows[0]:
            continue
        right.plot(labels, [r[key] for r in rows], marker="o", label=name)
    right.axhline(0.8, color="grey", linestyle="--", label="Get bar 0.8x")
    right.axhline(1.0, color="grey", linestyle=":", label="Put bar 1.0x")
    top = max(1.0, *(r[k] for r in rows for k in ("put_ratio", "get_ratio")))
    right.set_ylim(0, 1.15 * top)
    right.set_title(
        f"KVStore / raw redis-py; Lookup of {result['lookup_chain']} keys: "
        f"p50 {result['lookup_p50_ms']:.2f} ms",
        fontsize=9,
    )
    right.legend(fontsize=8)
    save_plot(path, fig)


def run(args: argparse.Namespace) -> int:
    if args.tune_malloc:
        from services.store.malloc import tune_malloc

        tune_malloc()
    import redis

    from kvpool.bench.report import environment, write_json
    from services.store.client import StoreClient
    from services.store.redis_process import RedisProcess

    load_before = os.getloadavg()[0]  # shared machines: record how busy this one was
    if args.processes or args.cluster:
        return _run_scaling(args, load_before)
    noise = HostNoise()
    local = None if args.redis else RedisProcess(maxmemory_bytes=2 << 30).start()
    url = args.redis or local.url  # type: ignore[union-attr]
    store, target = start_store(url)
    raw = redis.Redis.from_url(url)
    relay, relayed = _relayed_client(url)
    try:
        with (
            StoreClient(target, timeout_s=30) as client,
            StoreClient(target, timeout_s=30, data_path=False) as grpc_client,
        ):
            client.wait_ready(30)
            rows = []
            for size in (kib << 10 for kib in args.sizes):
                row = _measure_size(raw, client, grpc_client, size, args, store.pid, relayed)
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
            result = {"rows": rows, **_measure_lookup(raw, client, grpc_client, args)}
            from kvpool.bench.store_clients import aggregate_get

            result["aggregate_get"] = aggregate_get(url, target, args.clients, args.mib)
            for row in result["aggregate_get"]:
                print(json.dumps(row), flush=True)
    finally:
        raw.close()
        if relay is not None:
            relayed.close()  # type: ignore[union-attr]
            relay.close()
        store.terminate()
        store.wait(30)
        if local is not None:
            local.close()
    result["setup"] = {
        "batch_bytes": args.batch_bytes,
        "mib_per_phase": args.mib,
        "redis": "started by the benchmark" if local else "given",
        "client_malloc_tuned": args.tune_malloc,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **noise.since(),
        **environment(),
    }
    write_json(args.json, result)
    print(f"lookup of {result['lookup_chain']} keys: p50 {result['lookup_p50_ms']} ms")
    if args.plot:
        _plot(result, args.plot)
    return 0


def _run_scaling(args: argparse.Namespace, load_before: float) -> int:
    from kvpool.bench.report import environment, write_json
    from kvpool.bench.store_scaling import plot_scaling, run_scaling

    noise = HostNoise()
    if args.redis:
        raise ValueError("--processes and --cluster start their own Redis servers: drop --redis")
    if args.cluster and args.cluster < 3:
        raise ValueError(f"--cluster needs at least 3 masters, got {args.cluster}")
    result = run_scaling(args)
    result["setup"] = {
        "mib_per_phase": args.mib,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **noise.since(),
        **environment(),
    }
    write_json(args.json, result)
    if args.plot:
        plot_scaling(result, args.plot)
    return 0
