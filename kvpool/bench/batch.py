"""`kvpool bench batch`: what continuous batching buys one worker (workers.batch).

One `KVWorker` in this process (no store, no Ray: the worker's own scheduler is what is
measured) serves the same `--requests` distinct prompts, built from the shared corpus, at each
`--concurrency` (client threads, each running its next request as soon as its last one ends).
Concurrency 1 is the same requests served one at a time. Per level: aggregate output tokens/s,
TTFT p50/p99 (the client's wait from sending a request to its first token, queueing included),
time per output token (a stream's first to last token, over its tokens after the first), and the
largest batch the scheduler ran. EOS is ignored, so every request makes exactly
`--max-new-tokens` tokens.

Agreement: every greedy output is compared with the engine's solo path for the same request
(`Engine.generate`: one prefill pass, a batch of one). Per level it reports the sequences that are
identical and the token agreement (tokens before a sequence's first difference, over all tokens).

Writes JSON (`rows: [{concurrency, tokens_per_s, speedup, ttft_p50_ms, ttft_p99_ms, tpot_ms,
...}]`) and a plot.
"""

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from kvpool.bench.engines import add_engine_flag, parse_engines
from workers.api import WorkerConfig

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
QUESTIONS = (
    "Summarize the passage in one sentence.",
    "What does the passage say a cache stores?",
    "Name one cost the passage mentions.",
    "Rewrite the first sentence more simply.",
)


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = WorkerConfig()
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument(
        "--model", default=defaults.model, help="smollm2-135m (default), a HF id or a local folder"
    )
    parser.add_argument("--device", default=None, help="worker device (default: cuda if seen)")
    parser.add_argument("--codec", default=defaults.codec)
    parser.add_argument("--block-tokens", type=int, default=defaults.block_tokens)
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, DEFAULT_CONCURRENCY)),
        help="comma-separated client counts (default: 1,2,4,8,16); 1 is one request at a time",
    )
    parser.add_argument(
        "--requests", type=int, default=16, help="requests at each concurrency (default 16)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per request (default 64)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="about how long each prompt is (128)"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="the worker's --max-batch (default 0: the largest --concurrency)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=defaults.max_batch_tokens,
        help=f"the worker's --max-batch-tokens (default {defaults.max_batch_tokens})",
    )
    parser.add_argument(
        "--document", type=Path, default=None, help="text to build prompts from (default: corpus)"
    )
    add_engine_flag(parser, "the worker's")
    parser.add_argument(
        "--no-agreement",
        action="store_true",
        help="skip the solo reference runs (greedy agreement is then not reported)",
    )


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"--concurrency takes comma-separated integers >= 1, got {text!r}")
    return levels


def run(args: argparse.Namespace) -> int:
    levels = _levels(args.concurrency)
    for name in ("requests", "max_new_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_batch = args.max_batch or max(levels)

    runs = {}
    for engine in parse_engines(args.engine):
        config = WorkerConfig(
            model=args.model, device=args.device, codec=args.codec, block_tokens=args.block_tokens,
            max_batch=max_batch, max_batch_tokens=args.max_batch_tokens, node_tier=False,
            engine=engine,
        )  # fmt: skip
        runs[engine] = measure(config, levels, args)
    result = next(iter(runs.values()))
    if len(runs) > 1:  # side by side: the first engine's figures at the top, each under its name
        result = {**result, "by_engine": runs}
    from kvpool.bench.report import write_json

    write_json(args.json, result)
    _plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _prompts(encoder: Any, count: int, tokens: int, document: Path | None) -> list[list[int]]:
    """`count` distinct prompts of about `tokens` tokens: a numbered header, a corpus slice and a
    question, so no two share a first block."""
    from kvpool.commands.demo import load_corpus
    from workers.api import PromptInput

    corpus = encoder.encode_input(PromptInput(prompt=load_corpus(document)))
    corpus = corpus * (tokens * (count + 1) // max(1, len(corpus)) + 2)
    prompts = []
    for i in range(count):
        head = encoder.encode_input(PromptInput(prompt=f"Request {i}. Passage:\n"))
        tail = encoder.encode_input(PromptInput(prompt="\n" + QUESTIONS[i % len(QUESTIONS)]))
        body = max(1, tokens - len(head) - len(tail))
        offset = (i * 37) % max(1, len(corpus) - body)
        prompts.append([*head, *corpus[offset : offset + body], *tail])
    return prompts


def measure(config: WorkerConfig, levels: list[int], args: argparse.Namespace) -> dict[str, Any]:
    from kvpool.bench.report import environment
    from workers.actor import build_worker
    from workers.api import SamplingParams, TokenEvent, WorkDone, WorkRequest
    from workers.prompt import PromptEncoder

    worker: Any = build_worker(config, f"bench-batch-{config.engine}")
    try:
        info = worker.info()
        encoder = PromptEncoder.from_files(
            worker.tokenizer_files(), info.model, info.vocab_size, info.eos_token_ids
        )
        # Every request makes exactly max_new_tokens tokens.
        params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        prompts = _prompts(encoder, args.requests, args.prompt_tokens, args.document)
        requests = [WorkRequest(tuple(p), params, read_cache=False) for p in prompts]
        # Warm-up: lazy initialisation and the allocator, outside every clock.
        list(worker.generate(WorkRequest(tuple(prompts[0][:16]), SamplingParams(max_new_tokens=4))))
        reference: list[list[int]] | None = None
        if not args.no_agreement:
            reference = _solo(worker, prompts, requests, params)
        scheduler = getattr(worker, "scheduler", None)  # kvpool's own; vLLM's is not visible

        def level(concurrency: int) -> dict[str, Any]:
            pending = list(range(len(requests)))
            lock = threading.Lock()
            ttft: list[float] = []
            tpot: list[float] = []
            outputs: dict[int, list[int]] = {}

            def client() -> None:
                while True:
                    with lock:
                        if not pending:
                            return
                        index = pending.pop(0)
                    sent = time.perf_counter()
                    times, tokens = [], []
                    for item in worker.generate(requests[index]):
                        if isinstance(item, TokenEvent):
                            times.append(time.perf_counter())
                            tokens.append(item.token_id)
                        else:
                            assert isinstance(item, WorkDone)
                    with lock:
                        ttft.append((times[0] - sent) * 1000.0)
                        if len(times) > 1:
                            tpot.append((times[-1] - times[0]) * 1000.0 / (len(times) - 1))
                        outputs[index] = tokens

            before = scheduler.stats.largest_batch if scheduler is not None else 0
            if scheduler is not None:
                scheduler.stats.largest_batch = 0
            began = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - began
            largest = scheduler.stats.largest_batch if scheduler is not None else None
            if scheduler is not None:
                scheduler.stats.largest_batch = max(before, largest)
            made = sum(len(t) for t in outputs.values())
            row: dict[str, Any] = {
                "concurrency": concurrency,
                "requests": len(requests),
                "wall_s": round(wall, 2),
                "tokens": made,
                "tokens_per_s": round(made / wall, 2),
                "ttft_p50_ms": round(_percentile(ttft, 50), 1),
                "ttft_p99_ms": round(_percentile(ttft, 99), 1),
                "tpot_ms": round(sum(tpot) / len(tpot), 1) if tpot else 0.0,
                "largest_batch": largest,
            }
            if reference is not None:
                same = [outputs[i] == reference[i] for i in range(len(requests))]
                agreed = sum(_common_prefix(outputs[i], reference[i]) for i in outputs)
                row["identical_sequences"] = sum(same)
                row["token_agreement"] = round(agreed / max(1, made), 4)
            return row

        rows = []
        for concurrency in levels:
            row = level(concurrency)
            rows.append(row)
            print(row, flush=True)
        base = next((r for r in rows if r["concurrency"] == 1), rows[0])
        for row in rows:
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
        result: dict[str, Any] = {
            "benchmark": "batch",
            "engine": config.engine,
            "model": info.model,
            "device": info.device,
            "prompt_tokens": sum(map(len, prompts)) // len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "max_batch": config.max_batch,
            "max_batch_tokens": config.max_batch_tokens,
            "environment": environment(),
            "rows": rows,
        }
        if config.engine == "transformers":
            result["dtype"] = worker.loaded.geometry.dtype
            if worker.loaded.device.type == "cuda":
                import torch

                result["gpu"] = torch.cuda.get_device_name(worker.loaded.device)
        return result
    finally:
        worker.close()


def _solo(worker: Any, prompts: list[list[int]], requests: list[Any], params: Any) -> list:
    """Each request's greedy output alone: the transformers engine's solo path (one prefill
    pass, a batch of one), or a vLLM worker's requests one at a time."""
    from workers.api import WorkDone

    engine = getattr(worker, "engine", None)
    if engine is not None:
        return [engine.generate(p, params).token_ids for p in prompts]
    outputs = []
    for request in requests:
        done = [item for item in worker.generate(request) if isinstance(item, WorkDone)][-1]
        outputs.append(list(done.token_ids))
    return outputs


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    rows = result["rows"]
    x = [r["concurrency"] for r in rows]
    fig, axes = figure(ncols=2)
    left, right = axes[0]
    for engine, run in result.get("by_engine", {}).items():
        if engine != result["engine"]:
            other = run["rows"]
            left.plot([r["concurrency"] for r in other], [r["tokens_per_s"] for r in other],
                      marker="s", label=f"{engine} engine (one worker)")  # fmt: skip
    left.plot(x, [r["tokens_per_s"] for r in rows], marker="o",
              label=f"{result['engine']} engine, batched (one worker)")  # fmt: skip
    base = rows[0]["tokens_per_s"] / max(1e-9, rows[0]["speedup"])
    left.plot(x, [base] * len(x), linestyle="--", label="one request at a time")
    for r in rows:
        left.annotate(f"{r['speedup']}x", (r["concurrency"], r["tokens_per_s"]), fontsize=8)
    left.set_xscale("log", base=2)
    left.set_xticks(x, [str(c) for c in x])
    left.set_xlabel("concurrent requests")
    left.set_ylabel("aggregate output tokens/s")
    left.legend()
    runs = result.get("by_engine") or {result["engine"]: {"rows": rows}}
    for (engine, run), line in zip(runs.items(), ("-", "--", ":"), strict=False):
        name = f"{engine}: " if len(runs) > 1 else ""
        xs = [r["concurrency"] for r in run["rows"]]
        for key, marker, label, color in (
            ("ttft_p50_ms", "o", "TTFT p50", "C0"),
            ("ttft_p99_ms", "o", "TTFT p99", "C1"),
            ("tpot_ms", "s", "time per output token", "C2"),
        ):
            right.plot(xs, [r[key] for r in run["rows"]], marker=marker, linestyle=line,
                       color=color, label=f"{name}{label}")  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_xticks(x, [str(c) for c in x])
    right.set_yscale("log")
    right.set_xlabel("concurrent requests")
    right.set_ylabel("ms (log)")
    right.legend(fontsize=8)
    where = result.get("gpu") or result["device"]
    fig.suptitle(
        f"Continuous batching, {result['model']} on {where}: {result['prompt_tokens']}-token "
        f"prompts, {result['max_new_tokens']} new tokens"
    )
    save_plot(path, fig)
