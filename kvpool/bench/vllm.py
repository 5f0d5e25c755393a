"""`kvpool bench vllm`: vLLM engines sharing a 2,048-token prompt through kvpool's connector.

Run it with the python of `make vllm`'s venv (`.venv-vllm/bin/kvpool bench vllm --json F --plot
F.png`). It starts a redis-server and a `kvpool store serve` over it, then engines one after
another, each a process of its own (kvpool.bench.vllm_engine), on SmolLM2-135M and real text:

    A  connector on, cold:      a_miss_ms (it saves the prompt's blocks), then its own
                                 prefix-cache hit a_local_hit_ms
    B  connector on, fresh:     b_store_hit_ms (b_loaded_tokens from the store), then, its own
                                 prefix cache emptied, a prompt sharing the first 1,792 tokens
                                 with a new suffix, b_shared_ms (from the store too)
    C  connector off, fresh:    b_miss_ms, and the greedy text B's must equal
    N  vLLM's OffloadingConnector (CPU): native_offload_hit_ms after its prefix cache is reset,
                                 or the error this vLLM gave

Timings are one request's wall time with max_tokens=1 (time to first token), each after a
short warm-up request in the same engine; the greedy comparison runs 32 tokens. Every row
comes from this one run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CORPUS_NAMES = ("kv_cache_in_llms.txt", "kv_caching_explained.txt", "ai_kv_cache_concept.txt")
PROMPT_TOKENS, SHARED_TOKENS, GREEDY_TOKENS = 2048, 1792, 32


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument("--codec", default="raw", help="the connector's codec (raw: exact)")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of .txt files")
    parser.add_argument("--skip-native", action="store_true", help="no OffloadingConnector row")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from kvpool.bench.report import write_json
    from services.store.client import StoreClient
    from services.store.redis_process import RedisProcess, free_port, settled_block_keys
    from workers.models import smollm2_cache_path

    model = smollm2_cache_path()
    if not (model / "config.json").is_file():
        raise ValueError(f"{model} is missing: run `kvpool model prepare smollm2-135m` first")
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = _texts(args.corpus)
    ids = tokenizer.encode(" ".join(texts), add_special_tokens=False)
    other = tokenizer.encode(" ".join(reversed(texts)), add_special_tokens=False)
    if len(ids) < PROMPT_TOKENS or len(other) < PROMPT_TOKENS:
        raise ValueError(f"the corpus gives {len(ids)} tokens; {PROMPT_TOKENS} are needed")
    prompt = ids[:PROMPT_TOKENS]
    shared = prompt[:SHARED_TOKENS] + other[-(PROMPT_TOKENS - SHARED_TOKENS) :]
    work = Path(tempfile.mkdtemp(prefix="kvpool-bench-vllm-"))
    redis_proc = RedisProcess(port=free_port()).start()
    port = free_port()
    store = subprocess.Popen(
        [sys.executable, "-m", "kvpool.cli", "store", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--backend", redis_proc.url],
        stdout=open(work / "store.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    connector = {"store": target, "codec": args.codec}
    try:
        with StoreClient(target, timeout_s=60) as client:
            client.wait_ready(60)
        one = {"prompt_token_ids": prompt, "max_tokens": 1}
        # Each engine's first request pays one-time costs (allocations, first kernels): a short
        # unrelated prompt takes them, so every timed request is a warm one.
        warm = {"prompt_token_ids": other[:64], "max_tokens": 1}
        greedy = {"prompt_token_ids": prompt, "max_tokens": GREEDY_TOKENS}
        _, a_miss, a_hit = _engine(work, "a", connector, [warm, one, one])
        settled_block_keys(redis_proc.url)
        # B's own prefix cache is emptied before the shared prompt, or its 1,792 tokens would
        # come from there (the full prompt just ran) rather than from the store.
        reset = {"reset_prefix_cache": True}
        jobs = [warm, one, reset, {**one, "prompt_token_ids": shared}, reset, greedy]
        _, b_hit, b_shared, b_text = _engine(work, "b", connector, jobs)  # no result for a reset
        _, c_miss, c_text = _engine(work, "c", None, [warm, one, greedy])
        skipped = {"native_offload_error": "skipped (--skip-native)"}
        native = skipped if args.skip_native else _native(work, one)
        keys, memory = _redis_usage(redis_proc.url)
    finally:
        store.kill()
        store.wait(30)
        redis_proc.stop()
    agree = sum(a == b for a, b in zip(b_text["token_ids"], c_text["token_ids"], strict=False))
    result = {
        "bench": "vllm",
        "model": "smollm2-135m (float32, vLLM CPU, enforce_eager, prefix caching on)",
        "codec": args.codec,
        "prompt_tokens": len(prompt),
        "shared_prefix_tokens": SHARED_TOKENS,
        "a_miss_ms": a_miss["ms"],
        "a_local_hit_ms": a_hit["ms"],
        "b_store_hit_ms": b_hit["ms"],
        "b_loaded_tokens": b_hit["cached_tokens"],
        "b_shared_ms": b_shared["ms"],
        "b_shared_loaded_tokens": b_shared["cached_tokens"],
        "b_miss_ms": c_miss["ms"],
        **native,
        "greedy_equal": b_text["token_ids"] == c_text["token_ids"],
        "greedy_token_agreement": agree / max(1, len(c_text["token_ids"])),
        "store_bytes": memory,
        "keys_in_redis": keys,
        "store_hit_speedup": c_miss["ms"] / b_hit["ms"],
        "store_hit_over_local_hit": b_hit["ms"] / a_hit["ms"],
        "environment": {"cpus": os.cpu_count(), "vllm": _vllm_version()},
    }
    write_json(args.json, result)
    _plot(result, args.plot)
    for name in ("a_miss_ms", "a_local_hit_ms", "b_store_hit_ms", "b_shared_ms", "b_miss_ms",
                 "native_offload_hit_ms", "b_loaded_tokens", "greedy_equal", "keys_in_redis",
                 "store_bytes", "store_hit_speedup", "store_hit_over_local_hit"):  # fmt: skip
        if name in result:
            value = result[name]
            print(f"{name:28s} {value:.1f}" if isinstance(value, float) else f"{name:28s} {value}")
    if "native_offload_error" in result:
        print(f"{'native_offload_error':28s} {result['native_offload_error'][:200]}")
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _texts(folder: Path | None) -> list[str]:
    here = Path(__file__).resolve().parents[2]
    for candidate in (folder, here.parent / "shared" / "corpus", here / "docs"):
        if candidate is not None and candidate.is_dir():
            files = [candidate / n for n in CORPUS_NAMES if (candidate / n).is_file()]
            files = files or sorted(candidate.glob("*.txt")) or sorted(candidate.glob("*.md"))
            if files:
                return [" ".join(f.read_text().split()) for f in files]
    raise ValueError("no corpus: pass --corpus DIR (a folder of .txt files)")


def _engine(work: Path, name: str, connector: dict | None, jobs: list[dict], **extra: Any) -> list:
    from workers.models import smollm2_cache_path

    spec = {"model": str(smollm2_cache_path()), "connector": connector, "jobs": jobs, **extra}
    (work / f"{name}.json").write_text(json.dumps(spec))
    with open(work / f"{name}.log", "wb") as log:
        out = subprocess.run(
            [sys.executable, "-m", "kvpool.bench.vllm_engine", str(work / f"{name}.json")],
            stdout=subprocess.PIPE, stderr=log, text=True, timeout=900,
        )  # fmt: skip
    if out.returncode != 0:
        tail = (work / f"{name}.log").read_text()[-3000:]
        causes = [line for line in tail.splitlines() if "failed with error" in line]
        raise RuntimeError(
            f"engine {name} failed ({out.returncode}): {(causes or [''])[0]}\n{tail}"
        )
    return [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]


def _native(work: Path, one: dict) -> dict[str, Any]:
    try:
        _, native = _engine(work, "n", None, [one, {"reset_prefix_cache": True}, one],
                            native_offload=True)  # fmt: skip
    except RuntimeError as exc:  # the root cause: the first error line of the engine's log
        lines = [line.strip() for line in str(exc).splitlines() if "Error" in line]
        return {"native_offload_error": (lines or [str(exc)])[0][:500]}
    return {"native_offload_hit_ms": native["ms"], "native_offload_loaded": native["cached_tokens"]}


def _redis_usage(url: str) -> tuple[int, int]:
    import redis

    client = redis.Redis.from_url(url)
    keys = sum(1 for _ in client.scan_iter(match="kvpool:blk:*", count=1000))
    return keys, int(client.info("memory")["used_memory"])


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure()
    ax = axes[0][0]
    rows = [("A: miss (cold)", "a_miss_ms"), ("B: no connector", "b_miss_ms"),
            ("B: kvpool store hit", "b_store_hit_ms"), ("B: 1,792 shared", "b_shared_ms"),
            ("A: own prefix cache", "a_local_hit_ms"),
            ("vLLM CPU offload hit", "native_offload_hit_ms")]  # fmt: skip
    shown = [(label, result[key]) for label, key in rows if key in result]
    ax.barh([label for label, _ in shown], [ms for _, ms in shown], color="tab:blue")
    for i, (_, ms) in enumerate(shown):
        ax.text(ms, i, f" {ms:.0f} ms", va="center")
    ax.invert_yaxis()
    ax.set_xlabel(f"time to first token, ms ({result['prompt_tokens']}-token prompt)")
    ax.set_title(f"vLLM + kvpool connector ({result['codec']} blocks), SmolLM2-135M on CPU")
    save_plot(path, fig)
