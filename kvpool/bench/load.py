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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvpool.bench.load_report import Record, format_summary, plot, summarize, timeline
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
