"""`kvpool bench vllm-serve`: vLLM's own load generator against kvpool and against vLLM.

`vllm bench serve` (from `make vllm`'s venv) sends one shared-prefix workload
(`--dataset-name prefix_repetition`: a few long random prefixes, each with many short suffixes,
output lengths fixed with `--ignore-eos`) to each of these servers in turn, each started for
its row and stopped after it, on SmolLM2-135M:

    kvpool               `kvpool serve --http-port` with one worker (the transformers engine)
                         and its embedded store
    vllm                 `vllm serve --enable-prefix-caching`, no connector
    vllm_connector_cold  `vllm serve` with kvpool's connector over a `kvpool store serve` on a
                         real redis-server, the store empty: it saves every prompt's blocks
    vllm_connector_warm  a fresh `vllm serve` with the connector, the store as the previous row
                         left it: prefixes another process computed come from the store

Each row is the load generator's own JSON (TTFT p50/p99, TPOT, request and token throughput).
The generator's ready check sends the workload's first prompt before it starts the clock, so
every server has that one prefix cached when the timed run begins. Run from kvpool's venv:
`kvpool bench vllm-serve --json F --plot F.png`.
"""

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROWS = ("kvpool", "vllm", "vllm_connector_cold", "vllm_connector_warm")
SERVED_NAME = "smollm2-135m"
FIGURES = (
    "p50_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "p50_tpot_ms", "request_throughput",
    "output_throughput", "total_token_throughput", "completed", "failed", "duration",
)  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"),
                        help="the venv `make vllm` made (default .venv-vllm)")  # fmt: skip
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="shared prefix length")
    parser.add_argument("--suffix-tokens", type=int, default=64, help="each prompt's own suffix")
    parser.add_argument("--prefixes", type=int, default=4, help="distinct shared prefixes")
    parser.add_argument("--prompts", type=int, default=32, help="requests per row")
    parser.add_argument("--output-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--codec", default="int8", help="the connector's codec (default int8)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which of {', '.join(ROWS)}")


def run(args: argparse.Namespace) -> int:
    from kvpool.bench.report import write_json
    from services.store.redis_process import RedisProcess, free_port
    from workers.models import smollm2_cache_path

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not rows:
        raise ValueError(f"--rows takes some of {', '.join(ROWS)}; got {args.rows!r}")
    vllm = args.vllm_venv.resolve() / "bin" / "vllm"
    if not vllm.exists():
        raise ValueError(f"{vllm} is missing: run `make vllm` first")
    model = smollm2_cache_path()
    if not (model / "config.json").is_file():
        raise ValueError(f"{model} is missing: run `kvpool model prepare smollm2-135m` first")
    work = Path(tempfile.mkdtemp(prefix="kvpool-bench-vllm-serve-"))
    results: dict[str, Any] = {}
    redis_proc = (
        RedisProcess(port=free_port()).start() if any("connector" in r for r in rows) else None
    )
    try:
        store = _store(work, redis_proc.url) if redis_proc is not None else None
        try:
            for row in rows:
                port = free_port()
                argv = _server_argv(row, vllm, model, port, store and store[1], args.codec)
                with _serving(argv, port, work / f"{row}.log"):
                    results[row] = _load(vllm, model, port, args, work, row)
                print(f"{row}: p50 TTFT {results[row]['p50_ttft_ms']:.0f} ms", flush=True)
        finally:
            if store is not None:
                _stop(store[0])
    finally:
        if redis_proc is not None:
            redis_proc.stop()
    result = {
        "bench": "vllm-serve",
        "workload": {
            "dataset": "prefix_repetition", "prefix_tokens": args.prefix_tokens,
            "suffix_tokens": args.suffix_tokens, "prefixes": args.prefixes,
            "prompts": args.prompts, "output_tokens": args.output_tokens,
            "concurrency": args.concurrency, "ignore_eos": True, "codec": args.codec,
        },
        "rows": results,
        "environment": {"cpus": os.cpu_count()},
    }  # fmt: skip
    write_json(args.json, result)
    _plot(result, args.plot)
    _print(result)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _server_argv(
    row: str, vllm: Path, model: Path, port: int, store: str | None, codec: str
) -> list[str]:
    if row == "kvpool":
        from services.store.redis_process import free_port

        kvpool = Path(sys.executable).with_name("kvpool")
        return [str(kvpool), "serve", "--host", "127.0.0.1", "--port", str(free_port()),
                "--http-port",
                str(port), "--workers", "1", "--metrics-port", "0", "--insecure-no-auth",
                "--model", SERVED_NAME]  # fmt: skip
    argv = [str(vllm), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager",
            "--enable-prefix-caching", "--max-model-len", "4096",
            # On CPU, vLLM's default reserves 92% of the host's memory for its KV cache.
            "--kv-cache-memory-bytes", str(1 << 30)]  # fmt: skip
    if row.startswith("vllm_connector"):
        assert store is not None
        config = {
            "kv_connector": "KVPoolConnector",
            "kv_connector_module_path": "kvpool.integrations.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"store": store, "codec": codec},
        }
        argv += ["--kv-transfer-config", json.dumps(config)]
    return argv


def _store(work: Path, redis_url: str) -> tuple[subprocess.Popen, str]:
    from services.store.client import StoreClient
    from services.store.redis_process import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpool.cli", "store", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--backend", redis_url],
        stdout=open(work / "store.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    with StoreClient(f"127.0.0.1:{port}", timeout_s=60) as client:
        client.wait_ready(60)
    return proc, f"127.0.0.1:{port}"


@contextlib.contextmanager
def _serving(argv: list[str], port: int, log_path: Path) -> Iterator[None]:
    """Run a server until its OpenAI endpoint lists models; stop it (SIGINT, then kill) after."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} {argv[1]} exited ({proc.returncode}):\n"
                                   f"{log_path.read_text()[-3000:]}")  # fmt: skip
            models = f"http://127.0.0.1:{port}/v1/models"
            with contextlib.suppress(OSError), urllib.request.urlopen(models, timeout=5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[1]} did not serve in 600 s: see {log_path}")
            time.sleep(1)
        yield
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in a session of its own, with its children (vLLM's engine core)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _load(
    vllm: Path, model: Path, port: int, args: argparse.Namespace, work: Path, row: str
) -> dict[str, Any]:
    """One `vllm bench serve` run against the server on `port`: its figures."""
    argv = [str(vllm), "bench", "serve", "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{port}", "--model", SERVED_NAME,
            "--tokenizer", str(model), "--dataset-name", "prefix_repetition",
            "--prefix-repetition-prefix-len", str(args.prefix_tokens),
            "--prefix-repetition-suffix-len", str(args.suffix_tokens),
            "--prefix-repetition-num-prefixes", str(args.prefixes),
            "--prefix-repetition-output-len", str(args.output_tokens),
            "--num-prompts", str(args.prompts), "--max-concurrency", str(args.concurrency),
            "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(work),
            "--result-filename", f"{row}.json"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    with open(work / f"{row}-load.log", "wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve against {row} failed ({done.returncode}):\n"
            f"{(work / f'{row}-load.log').read_text()[-3000:]}"
        )
    raw = json.loads((work / f"{row}.json").read_text())
    return {name: raw[name] for name in FIGURES if name in raw}


def _print(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"vllm bench serve, prefix_repetition: {w['prefixes']} prefixes of "
          f"{w['prefix_tokens']} tokens, {w['prompts']} prompts (+{w['suffix_tokens']}), "
          f"{w['output_tokens']} tokens out, concurrency {w['concurrency']}")  # fmt: skip
    print(f"{'row':22s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s} {'req/s':>7s} "
          f"{'out tok/s':>9s} {'failed':>6s}")  # fmt: skip
    for row, r in result["rows"].items():
        print(f"{row:22s} {r['p50_ttft_ms']:9.0f} {r['p99_ttft_ms']:9.0f} "
              f"{r['p50_tpot_ms']:9.1f} {r['request_throughput']:7.2f} "
              f"{r['output_throughput']:9.1f} {r['failed']:6d}")  # fmt: skip


def _plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure(ncols=2)
    rows = list(result["rows"])
    ttft, tput = axes[0]
    p50 = [result["rows"][r]["p50_ttft_ms"] for r in rows]
    p99 = [result["rows"][r]["p99_ttft_ms"] for r in rows]
    y = range(len(rows))
    ttft.barh([i - 0.2 for i in y], p50, height=0.4, label="p50", color="tab:blue")
    ttft.barh([i + 0.2 for i in y], p99, height=0.4, label="p99", color="tab:orange")
    ttft.set_yticks(list(y), rows)
    ttft.invert_yaxis()
    ttft.set_xlabel("time to first token, ms")
    ttft.legend()
    tput.barh(rows, [result["rows"][r]["output_throughput"] for r in rows], color="tab:green")
    tput.invert_yaxis()
    tput.set_xlabel("output tokens/s")
    w = result["workload"]
    fig.suptitle(
        f"vllm bench serve, {w['prefixes']} x {w['prefix_tokens']}-token prefixes, "
        f"{w['prompts']} prompts, concurrency {w['concurrency']}; SmolLM2-135M, CPU"
    )
    save_plot(path, fig)
