"""`kvpool bench window`: a bounded cache with and without attention sinks, against the full cache.

StreamingLLM's claim, measured on our own window (`workers.window`): keeping the first few tokens
(the attention sinks) plus a recent window holds perplexity near the full cache's at bounded
memory, while a plain recent window does not. The text is the shared corpus (its files sorted and
concatenated, repeated only if too short) cut to `--tokens`. It is scored in a streaming fashion:
one token at a time, each token's logits scoring the next, on a `DynamicCache` per mode:

- `full`: never evicts;
- `sinks`: `CacheWindow(max_cache_tokens, sink_tokens, block_tokens)`;
- `window`: the same window with no sinks.

The windowed modes call `evict` at every block boundary, as the engine does. The three modes step
in lockstep (token i in every mode, then token i + 1), so a neighbour's burst on these shared
cores slows all three alike instead of one whole mode. A step's time covers the forward pass, the
log-softmax and any eviction. Writes JSON (`rows: [{mode, window, perplexity, peak_kv_bytes,
tokens_per_s, perplexity_after_window, by_position, ...}]`, and a `target` section) and a plot.
"""

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from workers.api import WorkerConfig
from workers.kv.bounds import DEFAULT_SINK_TOKENS

MODES = ("full", "sinks", "window")
WITHIN = 1.10  # the target: sinks' perplexity within 10% of the full cache's


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument("--model", default=WorkerConfig().model)
    parser.add_argument("--tokens", type=int, default=2048, help="length of the scored text")
    parser.add_argument("--max-cache-tokens", type=int, default=256, help="the window's bound")
    parser.add_argument(
        "--sink-tokens", type=int, default=DEFAULT_SINK_TOKENS, help="sinks kept in mode `sinks`"
    )
    parser.add_argument(
        "--block-tokens",
        type=int,
        default=WorkerConfig().block_tokens,
        help="evictions happen per block",
    )
    parser.add_argument(
        "--bucket-tokens", type=int, default=256, help="positions per point of the curves (256)"
    )
    parser.add_argument(
        "--corpus", type=Path, default=None, help="folder of .txt files (default: shared corpus)"
    )


def run(args: argparse.Namespace) -> int:
    if args.tokens < 2 or args.bucket_tokens < 1:
        raise ValueError(
            f"--tokens must be >= 2 and --bucket-tokens >= 1, got {args.tokens} and "
            f"{args.bucket_tokens}"
        )
    from workers.kv.bounds import CacheWindow

    windows = {
        "full": None,
        "sinks": CacheWindow(args.max_cache_tokens, args.sink_tokens, args.block_tokens),
        "window": CacheWindow(args.max_cache_tokens, 0, args.block_tokens),
    }
    if args.tokens <= args.max_cache_tokens:
        raise ValueError(
            f"--tokens ({args.tokens}) must exceed --max-cache-tokens ({args.max_cache_tokens}), "
            "or the window never evicts and the modes do not differ"
        )
    folder = _corpus_folder(args.corpus)
    load_before = os.getloadavg()
    import torch

    from kvpool.bench.report import environment, write_json
    from workers.models import load_model
    from workers.window import Rerotator

    loaded = load_model(args.model)
    rerotator = Rerotator(loaded.model)  # refuses models whose keys it cannot re-rotate
    token_ids, repeats = _text_tokens(loaded.tokenizer, folder, args.tokens)
    streams = [_Stream(mode, windows[mode]) for mode in MODES]
    with torch.inference_mode():
        _Stream("warm-up", None).score(loaded.model, token_ids[:16], rerotator)
        for stream in streams:
            stream.start(loaded.model.config)
        for fed, (token, target) in enumerate(pairwise(token_ids), start=1):
            for stream in streams:
                stream.step(loaded.model, token, target, rerotator)
            if fed % args.bucket_tokens == 0:
                print(f"fed {fed} of {len(token_ids) - 1} tokens", flush=True)
    rows = [stream.row(args.max_cache_tokens, args.bucket_tokens) for stream in streams]
    for row in rows:
        print({k: v for k, v in row.items() if k != "by_position"}, flush=True)
    result: dict[str, Any] = {
        "benchmark": "window",
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": loaded.geometry.dtype,
        "model_context": loaded.model.config.max_position_embeddings,
        "tokens": len(token_ids),
        "scored_tokens": len(token_ids) - 1,
        "max_cache_tokens": args.max_cache_tokens,
        "sink_tokens": args.sink_tokens,
        "block_tokens": args.block_tokens,
        "bucket_tokens": args.bucket_tokens,
        "corpus": {"files": sorted(p.name for p in folder.glob("*.txt")), "repeats": repeats},
        "scoring": "one token at a time, interleaved across modes; evict at block boundaries",
        "environment": environment(),
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "target": _target(rows),
        "rows": rows,
    }
    write_json(args.json, result)
    _plot(result, args.plot)
    print(result["target"])
    print(f"wrote {args.json} and {args.plot}")
    return 0


@dataclass(slots=True)
class _Stream:
    """One mode's cache and what it measured, one entry per fed token."""

    mode: str
    window: Any  # CacheWindow | None; workers.window is imported lazily
    cache: Any = None
    nll: list[float] = field(default_factory=list)  # entry i scores token i + 1
    seconds: list[float] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)  # after the forward, before any eviction
    evicted: int = 0

    def start(self, config) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=config)

    def step(self, model, token: int, target: int, rerotator) -> None:
        """Feed `token`, score `target` with its logits, then evict if on a block boundary."""
        import torch

        from workers.models import cache_keyword
        from workers.window import cache_bytes, evict

        started = time.perf_counter()
        input_ids = torch.tensor([[token]], device=model.device)  # [1, 1]
        out = model(input_ids=input_ids, use_cache=True, **{cache_keyword(model): self.cache})
        log_probs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [vocab]
        nll = -float(log_probs[target])
        kv_bytes = cache_bytes(self.cache)
        fed = len(self.nll) + 1
        if self.window is not None and fed % self.window.block_tokens == 0:
            self.evicted += evict(self.cache, self.window, rerotator)
        self.seconds.append(time.perf_counter() - started)
        self.nll.append(nll)
        self.kv_bytes.append(kv_bytes)

    def score(self, model, token_ids: list[int], rerotator) -> None:
        self.start(model.config)
        for token, target in pairwise(token_ids):
            self.step(model, token, target, rerotator)

    def row(self, max_cache_tokens: int, bucket_tokens: int) -> dict[str, Any]:
        # Entry i is the prediction of the token at position p = i + 1, made with p tokens fed.
        after = self.nll[max_cache_tokens - 1 :]
        fed = len(self.nll)
        buckets = []
        for start in range(0, fed + 1, bucket_tokens):  # positions [start, start + bucket)
            lo, hi = max(start, 1) - 1, min(start + bucket_tokens, fed + 1) - 1  # entries
            buckets.append(
                {
                    "start": lo + 1,
                    "stop": hi + 1,
                    "perplexity": _perplexity(self.nll[lo:hi]),
                    "tokens_per_s": round((hi - lo) / sum(self.seconds[lo:hi]), 2),
                    "peak_kv_bytes": max(self.kv_bytes[lo:hi]),
                }
            )
        return {
            "mode": self.mode,
            "window": None if self.window is None else self.window.max_cache_tokens,
            "sink_tokens": None if self.window is None else self.window.sink_tokens,
            "perplexity": _perplexity(self.nll),
            "peak_kv_bytes": max(self.kv_bytes),
            "tokens_per_s": round(fed / sum(self.seconds), 2),
            "perplexity_after_window": _perplexity(after),
            "scored_after_window": len(after),
            "fed_tokens": fed,
            "evicted_tokens": self.evicted,
            "kv_bytes_per_token": self.kv_bytes[0],  # one token fed, nothing evicted yet
            "by_position": buckets,
        }


def _perplexity(nll: list[float]) -> float:
    return round(math.exp(sum(nll) / len(nll)), 3)


def _target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode = {row["mode"]: row for row in rows}
    full, sinks, window = by_mode["full"], by_mode["sinks"], by_mode["window"]

    def ratio(row: dict[str, Any], key: str) -> float:
        return round(row[key] / full[key], 3)

    return {
        "goal": f"sinks perplexity <= {WITHIN} x full, at bounded memory; window degrades",
        "sinks_over_full": ratio(sinks, "perplexity"),
        "sinks_within_10pct": ratio(sinks, "perplexity") <= WITHIN,
        "sinks_over_full_after_window": ratio(sinks, "perplexity_after_window"),
        "sinks_within_10pct_after_window": ratio(sinks, "perplexity_after_window") <= WITHIN,
        "window_over_full": ratio(window, "perplexity"),
        "window_over_full_after_window": ratio(window, "perplexity_after_window"),
        "sinks_kv_over_full": ratio(sinks, "peak_kv_bytes"),
    }


def _corpus_folder(folder: Path | None) -> Path:
    from kvpool.commands.demo import corpus_dirs

    candidates = [folder] if folder is not None else corpus_dirs()
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.txt")):
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise ValueError(f"no .txt files in {searched}; pass --corpus FOLDER")


def _text_tokens(tokenizer, folder: Path, tokens: int) -> tuple[list[int], int]:
    """The corpus as `tokens` token ids, and how many times the text was repeated to get them."""
    paths = sorted(folder.glob("*.txt"))
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    repeats = -(-tokens // len(ids))
    if repeats > 1:
        ids = tokenizer("\n\n".join([text] * repeats), add_special_tokens=False)["input_ids"]
    return ids[:tokens], repeats


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure(ncols=3, size=(5.0, 4.0))
    ppl_ax, kv_ax, speed_ax = axes[0]
    styles = {"full": "o-", "sinks": "s-", "window": "^-"}
    for row in result["rows"]:
        buckets = row["by_position"]
        x = [(b["start"] + b["stop"]) / 2 for b in buckets]
        label = row["mode"] if row["window"] is None else f"{row['mode']} ({row['window']})"
        style = styles.get(row["mode"], "o-")
        ppl_ax.plot(x, [b["perplexity"] for b in buckets], style, label=label)
        kv_ax.plot(x, [b["peak_kv_bytes"] / 2**20 for b in buckets], style, label=label)
        speed_ax.plot(x, [b["tokens_per_s"] for b in buckets], style, label=label)
    for ax in (ppl_ax, kv_ax, speed_ax):
        ax.axvline(result["max_cache_tokens"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"position in the text (buckets of {result['bucket_tokens']})")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ppl_ax.set_yscale("log")
    ppl_ax.set_ylabel("perplexity per bucket (log)")
    ppl_ax.set_title(f"Streaming perplexity, {result['model']}")
    kv_ax.set_ylabel("peak KV cache, MiB")
    kv_ax.set_title(f"KV memory, sinks {result['sink_tokens']}, blocks {result['block_tokens']}")
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_title(f"Decode rate on {result['device']}")
    save_plot(path, fig)
