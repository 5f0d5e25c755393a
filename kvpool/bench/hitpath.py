"""`kvpool bench hitpath`: is a cache hit faster than recomputing? Miss, forced fetch and `auto`,
from the node tier and from the store, over links of several rates, in one run.

Everything runs in one process inside a private network namespace (the command re-executes
itself under `unshare -n` when a link rate is shaped; see kvpool.bench.link): a KVStore on the
memory backend whose port is rate-limited with `tc`, a local Ray with this node's tier (its
traffic stays on unshaped shared memory), and three in-process workers of the same model:

- A, the producer: prefills each prompt (the miss) and writes its blocks behind to both tiers;
- B, another worker of the same node: its hits come from the node tier (L2);
- C, standing in for another node's worker: no node tier, so its hits come from the store (L3).

For each link rate and prompt length, B and C serve the prompt with `fetch_plan="fetch"` (the
forced fetch) and then with "auto", each with an empty L1. Before them, each worker learns the
link with small forced fetches and its prefill rate from a miss of its own, as a worker in
service would from the requests it has served. TTFT is the worker's: receipt to first token,
the fetch included. Rows: {link_mbps, prompt_tokens, tier, miss_ms, fetch_ms, auto_ms, plan,
recomputed_tokens, rate_factor} (medians of --repeats runs; the miss is the median of the three
workers' misses); plus node_tier_gbps, store_gbps and memcpy_gbps measured in the same run.

The link rates: unless --link-mbps names them, each prompt length gets its own, around the
break-even that this machine has just measured. The miss gives the prefill time of the length;
the break-even is the rate at which the codec's blocks of the cached prefix cross the link in that
time (`derived` in the JSON); the link is then shaped at --rate-factors times it (0.25x to 4x by
default) and left unshaped, so every run has rows on both sides of the crossover, whatever the
machine. The break-even table per codec uses the measured prefill rate, or
--prefill-tokens-per-s when given (e.g. another machine's).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)
DEFAULT_RATE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # times the measured break-even
MIN_LINK_MBPS = 0.1  # tc takes rates in kbit/s; below this a derived rate is raised to it


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (default), a HF id or a local folder"
    )
    parser.add_argument("--device", default=None, help="worker device (default: cuda if seen)")
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument(
        "--lengths",
        default=",".join(map(str, DEFAULT_LENGTHS)),
        help="comma-separated prompt lengths in tokens (default: 512,1024,2048,4096)",
    )
    parser.add_argument(
        "--link-mbps",
        default="",
        help="comma-separated store link rates in Mbit/s, 0 for unshaped (default: unshaped and "
        "--rate-factors times the break-even measured for each length)",
    )
    parser.add_argument(
        "--rate-factors",
        default=",".join(f"{f:g}" for f in DEFAULT_RATE_FACTORS),
        help="multiples of the measured break-even to shape the link at, when --link-mbps is not "
        "given (default: 0.25,0.5,1,2,4)",
    )
    parser.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=None,
        help="prefill rate for the break-even table per codec (default: the one measured here, "
        "at the longest length; e.g. 29000 for Llama-3-8B on one H200)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="fetch and auto runs per cell, medians (3)"
    )
    parser.add_argument("--document", type=Path, default=None, help="text to build prompts from")


def _parse(text: str, what: str, minimum: float) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{what} takes comma-separated numbers >= {minimum:g}, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    lengths = [int(n) for n in _parse(args.lengths, "--lengths", 2)]
    rates = _parse(args.link_mbps, "--link-mbps", 0) if args.link_mbps else None
    factors = _parse(args.rate_factors, "--rate-factors", 0)
    if 0 in factors:
        raise ValueError(f"--rate-factors takes numbers > 0, got {args.rate_factors!r}")
    if args.prefill_tokens_per_s is not None and args.prefill_tokens_per_s <= 0:
        raise ValueError("--prefill-tokens-per-s must be > 0")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    from kvpool.bench.link import in_private_namespace, unavailable

    if (rates is None or any(rates)) and not in_private_namespace():
        reason = unavailable()
        if reason is not None:
            what = "--link-mbps" if rates else "shaping the link around the break-even"
            raise ValueError(
                f"{what} needs a private network namespace: {reason}; "
                "--link-mbps 0 measures the unshaped link only"
            )
        # Re-run this very command in a namespace of its own, where shaping touches nothing else.
        env = {**os.environ, "KVPOOL_PARENT_NETNS": str(os.stat("/proc/self/ns/net").st_ino)}
        argv = ["unshare", "-n", "--", sys.executable, "-m", "kvpool.cli", *_argv(args)]
        return subprocess_run(argv, env)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    result = measure(args, lengths, rates, factors)
    from kvpool.bench.report import write_json

    write_json(args.json, result)
    _plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    """This command's arguments, rebuilt from `args` (it may not have come from sys.argv)."""
    argv = ["bench", "hitpath", "--json", str(args.json), "--plot", str(args.plot)]
    argv += ["--model", args.model, "--codec", args.codec, "--block-tokens", str(args.block_tokens)]
    argv += ["--lengths", args.lengths, "--link-mbps", args.link_mbps]
    argv += ["--rate-factors", args.rate_factors, "--repeats", str(args.repeats)]
    if args.prefill_tokens_per_s is not None:
        argv += ["--prefill-tokens-per-s", str(args.prefill_tokens_per_s)]
    if args.device:
        argv += ["--device", args.device]
    if args.document:
        argv += ["--document", str(args.document)]
    return argv


def subprocess_run(argv: list[str], env: dict[str, str]) -> int:
    import subprocess

    return subprocess.run(argv, env=env).returncode


def link_rates(kv_bytes: float, miss_s: float, factors: list[float]) -> tuple[float, list[float]]:
    """(break-even Mbit/s, the rates to shape at: unshaped first) for a prefix of `kv_bytes`
    that the model prefills in `miss_s`."""
    break_even = kv_bytes * 8 / miss_s / 1e6
    return break_even, [0.0] + [max(MIN_LINK_MBPS, round(f * break_even, 1)) for f in factors]


def measure(
    args: argparse.Namespace, lengths: list[int], rates: list[float] | None, factors: list[float]
) -> dict[str, Any]:
    from dataclasses import replace

    import ray

    from kvpool.bench.link import bring_up_loopback, in_private_namespace, shape_store
    from kvpool.bench.report import environment
    from kvpool.commands.demo import load_corpus
    from services.stack import start_local_ray
    from services.store.server import StoreConfig, StoreServer
    from workers.api import PromptInput, SamplingParams, WorkerConfig, WorkRequest
    from workers.kv.block import encoded_bytes_per_token
    from workers.node_tier import start_node_tiers, stop_node_tiers
    from workers.worker import KVWorker

    shaped = in_private_namespace()
    if shaped:
        bring_up_loopback()
    load_before = os.getloadavg()
    store = StoreServer(StoreConfig(port=0, max_memory_bytes=8 << 30, grace_s=0))
    store.start()
    if shaped:
        shape_store(store, None)
    ray_dir = tempfile.mkdtemp(prefix="kvpool-ray-")
    start_local_ray(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    tiers = start_node_tiers(4 << 30)
    workers: list[KVWorker] = []
    try:
        base = WorkerConfig(
            model=args.model, device=args.device, codec=args.codec,
            block_tokens=args.block_tokens, store_target=store.target,
            store_timeout_s=600.0, fetch_plan="fetch",
        )  # fmt: skip

        def worker(wid: str, node_tier: bool) -> KVWorker:
            # One base config, so one namespace secret: the workers share blocks as one
            # deployment's do.
            workers.append(KVWorker(replace(base, node_tier=node_tier), wid))
            return workers[-1]

        a, b, c = worker("producer", True), worker("same-node", True), worker("other-node", False)
        if b.node is None:
            raise RuntimeError("the node tier did not start")
        params = SamplingParams(max_new_tokens=1)
        corpus = a.prompts.encode_input(PromptInput(prompt=load_corpus(args.document)))
        corpus = corpus * (max(lengths) // len(corpus) + 1)

        def prompt(length: int) -> tuple[int, ...]:
            header = a.prompts.encode_input(PromptInput(prompt=f"[hitpath {uuid.uuid4().hex}]\n"))
            return tuple((header + corpus)[:length])

        def ttft(w: KVWorker, ids: tuple[int, ...], **kw: Any) -> Any:
            items = list(w.generate(WorkRequest(ids, params, **kw)))
            return items[-1].usage

        for w in (a, b, c):  # warm-up: lazy initialisation
            ttft(w, prompt(2 * args.block_tokens), read_cache=False)
        a.flush(600)
        figures = _copy_rates(store.target, b)
        print(figures, flush=True)
        probe = prompt(args.block_tokens + 1)  # one block: teaches a worker the link
        ttft(a, probe, read_cache=False)
        per_token = encoded_bytes_per_token(args.codec, a.loaded.geometry, args.block_tokens)
        rows, derived = [], []
        for length in lengths:
            ids = prompt(length)
            misses = [ttft(a, ids, read_cache=False).ttft_ms]
            for w in (b, c):  # each learns its own prefill rate at this length
                misses.append(ttft(w, ids, read_cache=False).ttft_ms)
                w.forget_local()
            miss_ms = statistics.median(misses)
            a.flush(600)
            cached = (length - 1) // args.block_tokens * args.block_tokens
            break_even, around = link_rates(per_token * cached, miss_ms / 1000, factors)
            length_rates = around if rates is None else rates
            derived.append(
                {
                    "prompt_tokens": length,
                    "cached_tokens": cached,
                    "miss_ms": round(miss_ms, 1),
                    "prefill_tokens_per_s": round(length / (miss_ms / 1000), 1),
                    "kv_bytes": round(per_token * cached),
                    "break_even_mbit_s": round(break_even, 2),
                    "link_mbps": length_rates,
                }
            )
            print(
                f"{length} tokens: miss {miss_ms:.0f} ms, {args.codec} KV of the {cached} cached "
                f"tokens {per_token * cached / 1e6:.2f} MB -> break-even {break_even:.1f} Mbit/s; "
                f"link at {', '.join(f'{r:g}' if r else 'unshaped' for r in length_rates)}",
                flush=True,
            )
            for rate in length_rates:
                if shaped:
                    shape_store(store, rate or None)
                for tier, w in (("node", b), ("store", c)):
                    for _ in range(2):
                        w.forget_local()
                        ttft(w, probe, fetch_plan="fetch")
                    fetches, autos = [], []
                    for _ in range(args.repeats):  # alternating, so both see the same load
                        w.forget_local()
                        fetches.append(ttft(w, ids, fetch_plan="fetch"))
                        w.forget_local()
                        autos.append(ttft(w, ids, fetch_plan="auto"))
                    w.forget_local()
                    plans = [u.plan for u in autos]
                    plan = max(set(plans), key=plans.count)
                    row = {
                        "link_mbps": rate,
                        "rate_factor": round(rate / break_even, 3) if rate else None,
                        "prompt_tokens": length,
                        "tier": tier,
                        "miss_ms": round(miss_ms, 1),
                        "fetch_ms": round(statistics.median(u.ttft_ms for u in fetches), 1),
                        "auto_ms": round(statistics.median(u.ttft_ms for u in autos), 1),
                        "plan": plan,
                        "recomputed_tokens": int(
                            statistics.median(u.recomputed_tokens for u in autos)
                        ),
                        "plans": plans,
                        "fetch_cached_tokens": fetches[0].cached_tokens,
                        "auto_cached_tokens": [u.cached_tokens for u in autos],
                        "samples_ms": {
                            "miss": [round(v, 1) for v in misses],
                            "fetch": [round(u.ttft_ms, 1) for u in fetches],
                            "auto": [round(u.ttft_ms, 1) for u in autos],
                        },
                    }
                    best = min(row["miss_ms"], row["fetch_ms"])
                    row["auto_over_best"] = round(row["auto_ms"] / best, 3)
                    rows.append(row)
                    print(row, flush=True)
            if shaped:
                shape_store(store, None)
        geometry = a.loaded.geometry
        estimates = {w.worker_id: w.estimates.snapshot() for w in (b, c)}
    finally:
        for w in workers:
            w.close()
        stop_node_tiers(tiers)
        ray.shutdown()
        store.stop(0)
        shutil.rmtree(ray_dir, ignore_errors=True)
    return {
        "benchmark": "hitpath",
        "model": args.model,
        "codec": args.codec,
        "block_tokens": args.block_tokens,
        "repeats": args.repeats,
        "device": str(workers[0].loaded.device),
        "link": "tc htb on the store's port in a private namespace" if shaped else "loopback",
        "store_backend": "memory",
        "measured_at": "worker: receipt to first token, fetch included",
        "environment": environment(),
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        **figures,
        "node_tier_over_memcpy": round(figures["node_tier_gbps"] / figures["memcpy_gbps"], 3),
        "derived": derived,
        "break_even": _break_even(
            geometry,
            args.block_tokens,
            args.prefill_tokens_per_s or derived[-1]["prefill_tokens_per_s"],
        ),
        "auto": auto_summary(rows),
        "estimates": estimates,
        "rows": rows,
    }


def auto_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How `auto` did against the better of miss and forced fetch: the issue's two bars, within
    1.05x of it on every row, and at most 0.8x of it where miss and fetch are within 1.5x of each
    other (there the split overlaps the two)."""
    close = [
        r
        for r in rows
        if max(r["miss_ms"], r["fetch_ms"]) <= 1.5 * min(r["miss_ms"], r["fetch_ms"])
    ]
    worst = max((r["auto_over_best"] for r in rows), default=None)
    worst_close = max((r["auto_over_best"] for r in close), default=None)
    return {
        "worst_auto_over_best": worst,
        "rows_within_1_05": sum(r["auto_over_best"] <= 1.05 for r in rows),
        "rows": len(rows),
        "close_rows": len(close),
        "worst_auto_over_best_where_close": worst_close,
        "close_rows_within_0_8": sum(r["auto_over_best"] <= 0.8 for r in close),
    }


def _copy_rates(store_target: str, worker: Any) -> dict[str, float]:
    """GB/s of memcpy, of reading the node tier into a tensor, and of the store's Get.

    memcpy and the node tier are measured warm (pages already mapped: the median of three reads
    after a first one, which is reported apart, as `node_tier_first_read_gbps`).
    """
    import numpy as np
    import torch

    from services.store.client import StoreClient

    count, size = 32, 4 << 20
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 255, size, dtype=np.uint8).tobytes() for _ in range(count)]
    total = count * size
    dest = torch.empty(total, dtype=torch.uint8)  # [count * size]
    source = np.frombuffer(b"".join(values), dtype=np.uint8)
    np.copyto(dest.numpy(), source)  # first touch: page faults are not what is measured
    started = time.perf_counter()
    np.copyto(dest.numpy(), source)
    memcpy = total / (time.perf_counter() - started) / 1e9
    keys = [f"hitpath-copy-{uuid.uuid4().hex}-{i}" for i in range(count)]
    items = list(zip(keys, values, strict=True))
    assert worker.node is not None
    worker.node.put_many(items)
    reads = []
    for _ in range(4):  # the first maps the pages into this process; memcpy is measured warm too
        started = time.perf_counter()
        arrays = worker.node.read(worker.node.refs(keys))
        for i, array in enumerate(arrays):  # zero-copy views, copied once into the tensor
            dest[i * size : (i + 1) * size].numpy()[:] = array
        reads.append(total / (time.perf_counter() - started) / 1e9)
        del arrays
    worker.node.delete(keys)
    with StoreClient(store_target, timeout_s=120) as client:
        client.put_many(items)
        started = time.perf_counter()
        got = client.get_many(keys)
        store = total / (time.perf_counter() - started) / 1e9
        if len(got) != count:
            raise RuntimeError("the store did not return every value")
        client.delete(keys)
    return {
        "memcpy_gbps": round(memcpy, 2),
        "node_tier_gbps": round(statistics.median(reads[1:]), 2),
        "node_tier_first_read_gbps": round(reads[0], 2),
        "store_gbps": round(store, 2),
    }


def _break_even(geometry: Any, block_tokens: int, tokens_per_s: float) -> list[dict[str, Any]]:
    """Per codec: the link rate at which fetching a prefix costs what prefilling it does."""
    from workers.kv.block import encoded_bytes_per_token
    from workers.kv.hashing import CODEC_NAMES

    rows = []
    for codec in CODEC_NAMES:
        try:
            per_token = encoded_bytes_per_token(codec, geometry, block_tokens)
        except Exception:  # a codec this geometry cannot take (e.g. groups larger than heads)
            continue
        bytes_per_s = per_token * tokens_per_s
        rows.append(
            {
                "codec": codec,
                "kv_bytes_per_token": round(per_token),
                "prefill_tokens_per_s": tokens_per_s,
                "break_even_gbps": round(bytes_per_s / 1e9, 3),
                "break_even_mbit_s": round(bytes_per_s * 8 / 1e6, 1),
                "ten_x_hit_gbps": round(10 * bytes_per_s / 1e9, 2),
            }
        )
    for row in rows:
        print(
            f"break-even at {tokens_per_s:,.0f} prefill tokens/s, {row['codec']}: "
            f"{row['break_even_gbps']} GB/s ({row['break_even_mbit_s']} Mbit/s); a 10x hit "
            f"needs {row['ten_x_hit_gbps']} GB/s",
            flush=True,
        )
    return rows


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    tiers = ("node", "store")
    fig, axes = figure(ncols=2)
    for ax, tier in zip(axes[0], tiers, strict=True):
        rows = [r for r in result["rows"] if r["tier"] == tier]
        labels: list[str] = []
        for length in sorted({r["prompt_tokens"] for r in rows}):
            # Slowest link first, unshaped last; derived rates differ per length, their factors
            # do not, so the x axis is the position, labelled by the factor where there is one.
            cells = sorted(
                (r for r in rows if r["prompt_tokens"] == length),
                key=lambda r: (r["link_mbps"] == 0, r["link_mbps"]),
            )
            xs = list(range(len(cells)))
            fetch = [r["fetch_ms"] / r["miss_ms"] for r in cells]
            auto = [r["auto_ms"] / r["miss_ms"] for r in cells]
            (line,) = ax.plot(xs, fetch, "s--", alpha=0.6, label=f"{length} fetch")
            ax.plot(xs, auto, "o-", color=line.get_color(), label=f"{length} auto")
            for x, r in zip(xs, cells, strict=True):
                ax.annotate(r["plan"], (x, auto[x]), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
            if len(cells) > len(labels):
                labels = [_rate_label(r) for r in cells]
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_xlabel("store link (x: times the measured break-even)")
        ax.set_ylabel("TTFT / miss TTFT (log; below 1 beats recomputing)")
        ax.set_title(f"hit from the {tier} tier: {result['model']}, {result['codec']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_plot(path, fig)


def _rate_label(row: dict[str, Any]) -> str:
    if not row["link_mbps"]:
        return "unshaped"
    if row.get("rate_factor") is not None:
        return f"{row['rate_factor']:.2g}x"
    return f"{row['link_mbps']:g} Mbit/s"
