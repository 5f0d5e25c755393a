"""`kvpool bench load`: N concurrent gRPC clients with shared prefixes against a running stack.

Each client is a thread with its own channel. It sends Generate requests back to back until the
duration is up: a prompt is one of a few shared documents (as a system prompt or a pasted
document would be) followed by a question no other request asks, so the document's blocks can
come from a cache and the question's tail never can. Each request is timed at the client: TTFT
from sending it to receiving the first token, latency to the end of its stream. Failed requests
are counted by status code and never retried. Before the clock starts, each document is sent
once (`--warmup`), so the figures describe a service whose shared prompts are already cached.

The report: requests per second, p50/p90/p99 TTFT and latency, the hit rate (cached prompt tokens
over prompt tokens, by tier, and the share of requests that had any hit), errors by code, and a
per-second timeline. It is written as JSON, plotted, and printed. The exit status is 1 when any
request failed, so a script can require zero errors.

    kvpool bench load --target 127.0.0.1:50051 --clients 16 --duration 60 \\
        --json load.json --plot load.png

Without `--target` it starts the embedded stack in this process (memory store, local Ray,
`--workers` workers) and measures that.

`--abuse` adds `--abuse-clients` hostile clients for the same duration (`kvpool.bench.abuse`:
oversized bounded prompts, stop-string floods, idle streams, and with `--store` duplicate-key
Gets). Their outcomes are reported apart; the well-behaved clients' errors, and any worker lost
during the run (read from `--gateway-metrics`, or from the embedded stack), fail the command.
Compare the TTFT figures with a run without `--abuse`.
"""

import argparse
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.api import WorkerConfig

QUESTIONS = (
    "Summarize the document in one sentence.",
    "What is the main claim of the document?",
    "Name one trade-off the document mentions.",
    "Which term does the document define first?",
    "What would a skeptical reader ask about this?",
    "Give a title for the document.",
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="the gateway HOST:PORT (default: start one)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON results")
    parser.add_argument("--plot", required=True, type=Path, help="where to write the PNG plot")
    parser.add_argument(
        "--prompt-tokens", type=int, default=512, help="about how long each document is (512)"
    )
    parser.add_argument("--documents", type=int, default=4, help="shared documents (4)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="per request (8)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per request (300)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="requests per document sent one by one before the clock starts, not counted (1; "
        "0 measures a cold start)",
    )
    parser.add_argument("--seed", type=int, default=0, help="document choice per request")
    parser.add_argument("--corpus", type=Path, default=None, help="a folder of .txt documents")
    hostile = parser.add_argument_group("hostile clients (issue 14)")
    hostile.add_argument(
        "--abuse", action="store_true", help="mix hostile clients in (kvpool.bench.abuse)"
    )
    hostile.add_argument("--abuse-clients", type=int, default=4, help="hostile clients (4)")
    hostile.add_argument(
        "--store", default=None, metavar="HOST:PORT", help="the KVStore, for duplicate-key Gets"
    )
    hostile.add_argument(
        "--store-auth-token",
        default=os.environ.get("KVPOOL_STORE_AUTH_TOKEN"),
        help="the store's token (env KVPOOL_STORE_AUTH_TOKEN)",
    )
    hostile.add_argument(
        "--gateway-metrics",
        default=None,
        metavar="URL",
        help="the gateway's /metrics, to count workers lost during the run",
    )
    group = parser.add_argument_group("the stack started when --target is not given")
    group.add_argument("--workers", type=int, default=2)
    group.add_argument("--model", default=WorkerConfig().model)
    group.add_argument("--codec", default=WorkerConfig().codec)


@dataclass(frozen=True, slots=True)
class Record:
    """One request, as its client saw it. Times are seconds since the load started."""

    client: int
    document: int
    started_s: float
    ended_s: float
    code: str  # "OK" or the gRPC status code name
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    cached_local_tokens: int = 0
    cached_store_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""
    detail: str = ""  # the error message, for failed requests

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_store_tokens


def run(args: argparse.Namespace) -> int:
    _check(args)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # Ray's forks make gRPC chatty
    texts = _corpus(args.corpus)
    if args.target:
        return _measure(args, args.target, texts)
    from services.stack import local_stack
    from workers.api import WorkerConfig

    worker = WorkerConfig(model=args.model, codec=args.codec)
    with local_stack(worker, workers=args.workers, grace_s=5.0) as stack:
        pool = stack.gateway.pool
        return _measure(args, stack.gateway.target, texts, lambda: pool.deaths)


def _check(args: argparse.Namespace) -> None:
    for name in ("clients", "prompt_tokens", "documents", "max_new_tokens", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.duration <= 0 or args.timeout <= 0:
        raise ValueError("--duration and --timeout must be > 0 seconds")
    if args.abuse_clients < 1:
        raise ValueError(f"--abuse-clients must be >= 1, got {args.abuse_clients}")


def _measure(
    args: argparse.Namespace,
    target: str,
    texts: list[str],
    deaths: Callable[[], float] | None = None,
) -> int:
    from kvpool.bench import abuse
    from kvpool.bench.report import environment, write_json

    if deaths is None and args.gateway_metrics:
        deaths = lambda: _scrape_deaths(args.gateway_metrics)  # noqa: E731
    chars_per_token = _calibrate(target, texts[0], args.timeout)
    documents = _documents(texts, args.documents, int(args.prompt_tokens * chars_per_token))
    _warm_up(target, documents, args)
    load_before = os.getloadavg()
    deaths_before = deaths() if deaths else None
    hostile: list[abuse.Attempt] = []
    attacker = None
    if args.abuse:
        stop_at = time.perf_counter() + args.duration
        attacker = threading.Thread(
            target=lambda: hostile.extend(
                abuse.drive(
                    target, args.abuse_clients, stop_at, args.timeout, args.store,
                    args.store_auth_token,
                )
            ),
            name="abuse",
            daemon=True,
        )  # fmt: skip
        attacker.start()
    records = _drive(target, documents, args)
    if attacker is not None:
        attacker.join(args.timeout + 60)
    lost = None if deaths is None or deaths_before is None else deaths() - deaths_before
    result: dict[str, Any] = {
        "benchmark": "load",
        "target": target if args.target else f"embedded stack ({args.workers} workers)",
        "clients": args.clients,
        "duration_s": args.duration,
        "documents": args.documents,
        "document_tokens_target": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "warmup_requests_per_document": args.warmup,
        "measured_at": "client, over gRPC through the gateway",
        "environment": environment(),
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "summary": summarize(records, args.duration),
        "timeline": timeline(records),
        "requests": [asdict(r) for r in records],
    }
    if not args.target:
        result["stack"] = {"workers": args.workers, "model": args.model, "codec": args.codec}
    result["workers_lost"] = lost
    if args.abuse:
        result["abuse"] = {"clients": args.abuse_clients, "by_kind": abuse.summarize(hostile)}
    write_json(args.json, result)
    plot(result, args.plot)
    print(format_summary(result["summary"]))
    if args.abuse:
        for kind, figures in result["abuse"]["by_kind"].items():
            print(f"hostile {kind}: {figures}")
    if lost is not None:
        print(f"workers lost during the run: {lost:g}")
    print(f"wrote {args.json} and {args.plot}")
    return 1 if result["summary"]["errors"] or lost else 0


def _scrape_deaths(url: str) -> float:
    """`kvpool_gateway_worker_deaths_total` from the gateway's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("kvpool_gateway_worker_deaths")
    )


# --- workload ------------------------------------------------------------------------------


def _corpus(folder: Path | None) -> list[str]:
    from kvpool.commands.demo import corpus_dirs

    folders = [folder] if folder is not None else corpus_dirs()
    for candidate in folders:
        if candidate.is_dir():
            paths = sorted(candidate.glob("*.txt"))
            texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
            texts = [t for t in texts if t.strip()]
            if texts:
                return texts
    searched = ", ".join(str(f) for f in folders)
    raise ValueError(f"no .txt documents in {searched}; pass --corpus FOLDER")


def _calibrate(target: str, text: str, timeout_s: float) -> float:
    """Characters per token of this model's tokenizer on the corpus, from one short request."""
    from services.gateway.client import InferenceClient

    sample = text[:4000]
    with InferenceClient(target, timeout_s=timeout_s) as client:
        prompt = f"[calibration {uuid.uuid4().hex}]\n{sample}"  # unique: no cache, no sharing
        done = client.generate(prompt=prompt, max_new_tokens=1)
    return max(1.0, len(sample) / max(1, done.usage["prompt_tokens"]))


def _documents(texts: list[str], count: int, chars: int) -> list[str]:
    """`count` distinct documents of about `chars` characters each."""
    documents = []
    for k in range(count):
        text = texts[k % len(texts)]
        # Documents beyond the corpus's count start further into their text, so they differ.
        start = (k // len(texts)) * chars % max(1, len(text))
        body = (text[start:] + "\n" + text) * (chars // max(1, len(text)) + 2)
        documents.append(f"Document {k + 1}.\n{body[:chars]}")
    return documents


def _warm_up(target: str, documents: list[str], args: argparse.Namespace) -> None:
    """Each document `--warmup` times, one request at a time: the steady state a service with
    shared prompts is in, rather than every client missing on the same documents at once."""
    from services.gateway.client import InferenceClient

    with InferenceClient(target, timeout_s=args.timeout) as client:
        for n in range(args.warmup):
            for document in documents:
                client.generate(prompt=_prompt(document, -1, n), max_new_tokens=1)


def _prompt(document: str, client: int, n: int) -> str:
    question = QUESTIONS[(client + n) % len(QUESTIONS)]
    return f"{document}\n\nQuestion {client}.{n}: {question}"


def _drive(target: str, documents: list[str], args: argparse.Namespace) -> list[Record]:
    records: list[Record] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + args.duration

    def client(index: int) -> None:
        import grpc

        from kvpool.v1 import inference_pb2 as pb
        from kvpool.v1 import inference_pb2_grpc

        chooser = random.Random(args.seed * 1000 + index)
        with grpc.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            n = 0
            while time.perf_counter() < stop_at:
                doc = chooser.randrange(len(documents))
                request = pb.GenerateRequest(prompt=_prompt(documents[doc], index, n))
                request.sampling.max_new_tokens = args.max_new_tokens
                record = _one(stub, request, index, doc, start, args.timeout)
                with lock:
                    records.append(record)
                n += 1

    threads = [
        threading.Thread(target=client, args=(i,), name=f"load-client-{i}", daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.timeout + 30)
    return sorted(records, key=lambda r: r.started_s)


def _one(stub: Any, request: Any, client: int, doc: int, start: float, timeout_s: float) -> Record:
    import grpc

    sent = time.perf_counter()
    first: float | None = None
    last = None
    try:
        for chunk in stub.Generate(request, timeout=timeout_s):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            last = chunk
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        return Record(
            client, doc, sent - start, time.perf_counter() - start, code.name, detail=details or ""
        )
    ended = time.perf_counter()
    usage = last.usage if last is not None else None
    if usage is None or first is None:
        return Record(client, doc, sent - start, ended - start, "EMPTY_STREAM")
    return Record(
        client=client,
        document=doc,
        started_s=sent - start,
        ended_s=ended - start,
        code="OK",
        ttft_ms=(first - sent) * 1000.0,
        prompt_tokens=usage.prompt_tokens,
        cached_local_tokens=usage.cached_tokens_by_tier.local,
        cached_store_tokens=usage.cached_tokens_by_tier.store,
        completion_tokens=usage.completion_tokens,
        worker=usage.worker,
    )


# --- report --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summarize(records: list[Record], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.code == "OK"]
    failed = [r for r in records if r.code != "OK"]
    # Requests in flight when the duration ended still count; the rate uses the time they took.
    elapsed = max([duration_s, *(r.ended_s for r in records)])
    ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    latencies = [(r.ended_s - r.started_s) * 1000.0 for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    local = sum(r.cached_local_tokens for r in ok)
    store = sum(r.cached_store_tokens for r in ok)
    hits = [r for r in ok if r.cached_tokens > 0]
    misses = [r.ttft_ms for r in ok if r.cached_tokens == 0 and r.ttft_ms is not None]
    hit_ttfts = [r.ttft_ms for r in hits if r.ttft_ms is not None]
    return {
        "requests": len(ok),
        "errors": len(failed),
        "errors_by_code": dict(Counter(r.code for r in failed)),
        "error_examples": sorted({f"{r.code}: {r.detail}" for r in failed})[:5],
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed else 0.0,
        "completion_tokens_per_s": round(sum(r.completion_tokens for r in ok) / elapsed, 2)
        if elapsed
        else 0.0,
        "ttft_ms": {
            "p50": _ms(percentile(ttfts, 50)),
            "p90": _ms(percentile(ttfts, 90)),
            "p99": _ms(percentile(ttfts, 99)),
            "max": _ms(max(ttfts, default=None)),
            "hit_p50": _ms(percentile(hit_ttfts, 50)),
            "miss_p50": _ms(percentile(misses, 50)),
        },
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
        },
        "prompt_tokens_mean": round(prompt / len(ok), 1) if ok else 0.0,
        "hit_rate_tokens": round((local + store) / prompt, 4) if prompt else 0.0,
        "hit_rate_tokens_by_tier": {
            "local": round(local / prompt, 4) if prompt else 0.0,
            "store": round(store / prompt, 4) if prompt else 0.0,
        },
        "requests_with_hit": round(len(hits) / len(ok), 4) if ok else 0.0,
        "requests_by_worker": dict(Counter(r.worker for r in ok)),
    }


def timeline(records: list[Record]) -> list[dict[str, Any]]:
    """Per second of the run (by when requests ended): completions, errors, median TTFT."""
    seconds: dict[int, list[Record]] = {}
    for r in records:
        seconds.setdefault(int(r.ended_s), []).append(r)
    rows = []
    for second in range(max(seconds, default=-1) + 1):
        done = seconds.get(second, [])
        ttfts = [r.ttft_ms for r in done if r.code == "OK" and r.ttft_ms is not None]
        rows.append(
            {
                "second": second,
                "completed": sum(r.code == "OK" for r in done),
                "errors": sum(r.code != "OK" for r in done),
                "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            }
        )
    return rows


def format_summary(s: dict[str, Any]) -> str:
    t, lat = s["ttft_ms"], s["latency_ms"]
    tiers = s["hit_rate_tokens_by_tier"]
    lines = [
        f"requests      {s['requests']} in {s['elapsed_s']} s = {s['requests_per_s']} req/s "
        f"({s['completion_tokens_per_s']} generated tokens/s)",
        f"TTFT ms       p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  "
        f"(hits p50 {t['hit_p50']}, misses p50 {t['miss_p50']})",
        f"latency ms    p50 {lat['p50']}  p99 {lat['p99']}",
        f"hit rate      {s['hit_rate_tokens']:.1%} of {s['prompt_tokens_mean']} prompt tokens "
        f"(local {tiers['local']:.1%}, store {tiers['store']:.1%}); "
        f"{s['requests_with_hit']:.1%} of requests had a hit",
        f"errors        {s['errors']} {s['errors_by_code'] or ''}",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from kvpool.bench.report import figure, save_plot

    fig, axes = figure(ncols=2, size=(6.0, 4.0))
    scatter, rate = axes[0]
    requests = [r for r in result["requests"] if r["code"] == "OK"]
    for label, hit, marker in (("prefix hit", True, "."), ("miss", False, "x")):
        chosen = [r for r in requests if _had_hit(r) == hit]
        scatter.scatter(
            [r["started_s"] for r in chosen],
            [r["ttft_ms"] for r in chosen],
            s=10,
            marker=marker,
            label=f"{label} ({len(chosen)})",
        )
    ttft = result["summary"]["ttft_ms"]
    for name, style in (("p50", "--"), ("p99", ":")):
        if ttft[name] is not None:
            label = f"{name} {ttft[name]:.0f} ms"
            scatter.axhline(ttft[name], linestyle=style, color="gray", label=label)
    if requests:
        scatter.set_yscale("log")
    scatter.set_xlabel("request sent at, s")
    scatter.set_ylabel("time to first token, ms (log)")
    scatter.set_title(f"TTFT of each request, {result['clients']} clients")
    scatter.grid(True, which="both", alpha=0.3)
    scatter.legend(fontsize=8)

    rows = result["timeline"]
    seconds = [r["second"] for r in rows]
    rate.bar(seconds, [r["completed"] for r in rows], width=1.0, label="completed")
    rate.bar(
        seconds,
        [r["errors"] for r in rows],
        width=1.0,
        bottom=[r["completed"] for r in rows],
        color="red",
        label="errors",
    )
    s = result["summary"]
    rate.set_xlabel("second of the run")
    rate.set_ylabel("requests finished")
    rate.set_title(
        f"{s['requests_per_s']} req/s, hit rate {s['hit_rate_tokens']:.0%}, {s['errors']} errors"
    )
    rate.grid(True, axis="y", alpha=0.3)
    rate.legend(fontsize=8)
    save_plot(path, fig)


def _had_hit(record: dict[str, Any]) -> bool:
    return record["cached_local_tokens"] + record["cached_store_tokens"] > 0
