"""`kvpool bench ttft`: time to first token on a miss, a store hit and a local hit, in one run.

The whole stack runs in this process (store on the memory backend, a local Ray with two worker
actors, the gateway on a loopback port) and every request goes through gRPC, so the figures are
what a client sees. For each prompt length and repeat, a fresh prompt (a unique header, then
corpus text, cut to exactly that many tokens) is sent three times:

1. miss: nothing cached; worker A prefills everything and writes its blocks behind;
2. store hit: A is drained, so worker B serves it from blocks fetched from the store (L2);
3. local hit: B is drained, so A serves it from its own L1.

TTFT is measured at the client, from sending the request to receiving the first token. Each time
cell is the median over the repeats; each speedup is the median of the per-repeat ratios, since
a miss and its hits run seconds apart and so share the machine's load at that moment (these
machines are shared and busy; the load average is recorded with the results). Writes JSON
(`rows: [{prompt_tokens, miss_ms, store_hit_ms, local_hit_ms, store_speedup, local_speedup,
...}]`) and a plot.
"""

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from kvpool.bench.engines import add_engine_flag, parse_engines
from workers.api import WorkerConfig

DEFAULT_LENGTHS = (256, 512, 1024, 2048)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument("--model", default=WorkerConfig().model)
    parser.add_argument("--codec", default=WorkerConfig().codec)
    parser.add_argument("--block-tokens", type=int, default=WorkerConfig().block_tokens)
    parser.add_argument(
        "--lengths",
        default=",".join(map(str, DEFAULT_LENGTHS)),
        help="comma-separated prompt lengths in tokens (default: 256,512,1024,2048)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="fresh prompts per length (5)")
    parser.add_argument("--document", type=Path, default=None, help="text to build prompts from")
    add_engine_flag(parser)


def run(args: argparse.Namespace) -> int:
    lengths = _parse_lengths(args.lengths)
    # gRPC's C core logs every fork Ray makes at INFO; only errors are worth showing here.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    from kvpool.bench.report import environment, write_json
    from kvpool.commands.demo import load_corpus
    from services.stack import local_stack
    from workers.api import PromptInput, WorkerConfig

    text = load_corpus(args.document)
    engines = parse_engines(args.engine)
    load_before = os.getloadavg()
    rows = []
    for engine in engines:
        # No node tier: the "store hit" here is what another node's worker sees (L3 over
        # gRPC), as before the node tier existed; `kvpool bench hitpath` measures the node tier.
        worker = WorkerConfig(
            model=args.model, codec=args.codec, block_tokens=args.block_tokens, node_tier=False,
            engine=engine,
        )  # fmt: skip
        rows += _measure(worker, text, lengths, args.repeats, local_stack, PromptInput)
    result: dict[str, Any] = {
        "benchmark": "ttft",
        "engines": engines,
        "model": args.model,
        "codec": args.codec,
        "block_tokens": args.block_tokens,
        "workers": 2,
        "worker_cpus": 1,
        "repeats": args.repeats,
        "measured_at": "client, over gRPC through the gateway",
        "environment": environment(),
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "rows": rows,
    }
    write_json(args.json, result)
    _plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _measure(
    worker: Any, text: str, lengths: list[int], repeats: int, local_stack: Any, prompt_input: Any
) -> list[dict[str, Any]]:
    """Each length's miss, store hit (the other worker) and local hit on one engine's stack."""
    with local_stack(worker, workers=2, grace_s=5.0) as stack:
        gateway = stack.gateway
        corpus = gateway.pool.prompts.encode_input(prompt_input(prompt=text))
        max_len = max(lengths)
        if len(corpus) < max_len:
            corpus = corpus * (max_len // len(corpus) + 1)  # long enough for the longest prompt

        def prompt(length: int) -> list[int]:
            header = f"[benchmark prompt {uuid.uuid4().hex}]\n"
            ids = gateway.pool.prompts.encode_input(prompt_input(prompt=header))
            return (ids + corpus)[:length]

        with stack.client() as client:
            for _ in range(2):  # warm-up: lazy initialisation in both workers
                _ttft(client, prompt(64))
            rows = []
            for length in lengths:
                samples: dict[str, list[float]] = {"miss": [], "store": [], "local": []}
                cached: dict[str, int] = {}
                for _ in range(repeats):
                    ids = prompt(length)
                    miss_ms, miss = _ttft(client, ids)
                    stack.flush()
                    with stack.drained(miss["worker"]):
                        store_ms, store = _ttft(client, ids)
                    with stack.drained(store["worker"]):
                        local_ms, local = _ttft(client, ids)
                    if miss["worker"] == store["worker"] or local["worker"] != miss["worker"]:
                        raise RuntimeError("the benchmark could not place requests on both workers")
                    samples["miss"].append(miss_ms)
                    samples["store"].append(store_ms)
                    samples["local"].append(local_ms)
                    cached = {
                        "miss_cached_tokens": miss["cached"],
                        "store_hit_cached_tokens": store["cached_store"],
                        "local_hit_cached_tokens": local["cached_local"],
                    }
                row = {"engine": worker.engine, **_row(length, samples, cached)}
                rows.append(row)
                print(row, flush=True)
    return rows


def _ttft(client, token_ids: list[int]) -> tuple[float, dict[str, Any]]:
    """Client-side ms to the first token, and the final usage of a 1-token generation."""
    started = time.perf_counter()
    stream = client.stream(token_ids=token_ids, max_new_tokens=1)
    first_ms = 0.0
    last = None
    for chunk in stream:
        if chunk.token_ids and not first_ms:
            first_ms = (time.perf_counter() - started) * 1000.0
        last = chunk
    usage = last.usage
    return first_ms, {
        "worker": usage.worker,
        "cached": usage.cached_tokens,
        "cached_local": usage.cached_tokens_by_tier.local,
        "cached_store": usage.cached_tokens_by_tier.store,
    }


def _row(length: int, samples: dict[str, list[float]], cached: dict[str, int]) -> dict[str, Any]:
    miss, store, local = (statistics.median(samples[k]) for k in ("miss", "store", "local"))

    def speedup(hit: str) -> float:
        ratios = [m / h for m, h in zip(samples["miss"], samples[hit], strict=True)]
        return round(statistics.median(ratios), 1)

    return {
        "prompt_tokens": length,
        "miss_ms": round(miss, 1),
        "store_hit_ms": round(store, 1),
        "local_hit_ms": round(local, 1),
        "store_speedup": speedup("store"),
        "local_speedup": speedup("local"),
        **cached,
        "samples_ms": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
    }


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        lengths = []
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"--lengths takes comma-separated integers >= 2, got {text!r}")
    return lengths


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure()
    ax = axes[0][0]
    styles = {"transformers": "-", "vllm": "--"}
    for engine in result["engines"]:
        rows = [r for r in result["rows"] if r["engine"] == engine]
        x = [r["prompt_tokens"] for r in rows]
        line = styles.get(engine, ":")
        ax.plot(x, [r["miss_ms"] for r in rows], "o" + line, color="tab:red",
                label=f"{engine}: miss (full prefill)")  # fmt: skip
        ax.plot(x, [r["store_hit_ms"] for r in rows], "s" + line, color="tab:blue",
                label=f"{engine}: store hit, other worker; labels: speedup")  # fmt: skip
        ax.plot(x, [r["local_hit_ms"] for r in rows], "^" + line, color="tab:green",
                label=f"{engine}: local hit, same worker")  # fmt: skip
        for r in rows:
            ax.annotate(
                f"{r['store_speedup']}x",
                (r["prompt_tokens"], r["store_hit_ms"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
    x = sorted({r["prompt_tokens"] for r in result["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token, ms (log)")
    ax.set_title(
        f"TTFT through the gateway: {result['model']}, {result['codec']} blocks, CPU workers\n"
        f"engine: {' vs '.join(result['engines'])}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_plot(path, fig)
