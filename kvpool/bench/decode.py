"""`kvpool bench decode`: what the KV cache buys during decode, on the real model.

For each count of new tokens, after one fixed prompt, it times three runs of the same work:
our decode loop with the KV cache, our loop recomputing the whole sequence at every step (no
cache), and `model.generate` with transformers' own cache. EOS is ignored so every run produces
exactly the requested tokens. Writes JSON (`rows: [{new_tokens, with_cache_s, without_cache_s,
speedup, hf_generate_s, ...}]`) and a plot.
"""

import argparse
import json
import platform
import time
from pathlib import Path

from workers.api import WorkerConfig

DEFAULT_NEW_TOKENS = (32, 128, 512)
DEFAULT_PROMPT = (
    "A key-value cache stores the attention keys and values of tokens a transformer has already "
    "processed, so that generating the next token only computes attention for the newest one. "
    "Explain, step by step and in detail, how this changes the cost of generating long answers."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument("--model", default=WorkerConfig().model)
    parser.add_argument(
        "--new-tokens",
        default=",".join(map(str, DEFAULT_NEW_TOKENS)),
        help="comma-separated counts of new tokens (default: 32,128,512)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the fixed prompt")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of the cached loop and of model.generate; the best counts",
    )


def run(args: argparse.Namespace) -> int:
    counts = _parse_counts(args.new_tokens)
    import torch

    from workers.api import SamplingParams
    from workers.engine import Engine
    from workers.models import load_model
    from workers.prompt import PromptEncoder

    loaded = load_model(args.model)
    engine = Engine(loaded)
    engine.eos_token_ids = frozenset()  # time exactly the requested number of tokens
    prompt_ids = PromptEncoder.for_model(loaded).encode(prompt=args.prompt)
    input_ids = torch.tensor([prompt_ids], device=loaded.device)

    def timed(fn) -> tuple[float, list[int]]:
        start = time.perf_counter()
        tokens = fn()
        return time.perf_counter() - start, tokens

    engine.generate(prompt_ids, SamplingParams(max_new_tokens=4))  # warm-up: lazy init, allocator
    rows = []
    for n in counts:
        params = SamplingParams(max_new_tokens=n)

        def hf(n=n) -> list[int]:
            with torch.inference_mode():
                out = loaded.model.generate(
                    input_ids,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=loaded.tokenizer.pad_token_id,
                )
            return out[0, len(prompt_ids) :].tolist()

        # Our loop and model.generate alternate, and each keeps its best time: on shared cores
        # a neighbour's burst then inflates neither side of the comparison.
        ours_times, hf_times = [], []
        for _ in range(args.repeats):
            seconds, ours = timed(lambda p=params: engine.generate(prompt_ids, p).token_ids)
            ours_times.append(seconds)
            seconds, hf_tokens = timed(hf)
            hf_times.append(seconds)
        # Without the cache a run is long enough that one is representative.
        without_cache_s, recomputed = timed(
            lambda p=params: engine.generate(prompt_ids, p, use_cache=False).token_ids
        )
        with_cache_s, hf_s = min(ours_times), min(hf_times)
        row = {
            "new_tokens": n,
            "with_cache_s": round(with_cache_s, 3),
            "without_cache_s": round(without_cache_s, 3),
            "speedup": round(without_cache_s / with_cache_s, 2),
            "hf_generate_s": round(hf_s, 3),
            "ours_vs_hf": round(with_cache_s / hf_s, 3),
            "with_cache_runs_s": [round(t, 3) for t in ours_times],
            "hf_generate_runs_s": [round(t, 3) for t in hf_times],
            "tokens_equal_without_cache": ours == recomputed,
            "tokens_equal_hf": ours == hf_tokens,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "benchmark": "decode",
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": loaded.geometry.dtype,
        "prompt_tokens": len(prompt_ids),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--new-tokens takes comma-separated positive integers, got {text!r}"
        ) from None
    if not counts or any(n <= 0 for n in counts):
        raise ValueError(f"--new-tokens takes comma-separated positive integers, got {text!r}")
    return counts


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [str(r["new_tokens"]) for r in rows]
    x = range(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - width for i in x], [r["without_cache_s"] for r in rows], width, label="no cache")
    ax.bar(list(x), [r["with_cache_s"] for r in rows], width, label="kvpool engine, KV cache")
    ax.bar([i + width for i in x], [r["hf_generate_s"] for r in rows], width, label="HF generate")
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['speedup']}x",
            (i - width, r["without_cache_s"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel(f"new tokens after a {result['prompt_tokens']}-token prompt")
    ax.set_ylabel("seconds (log)")
    ax.set_title(f"Decode time, {result['model']} on {result['device']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
