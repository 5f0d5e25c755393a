"""`kvpool demo` (also `make demo`): the whole stack in this process, on a workload that shares
prefixes, with a table of what the cache saved.

It starts a KVStore (memory backend), a local Ray cluster with two SmolLM2 worker actors and the
gateway, then sends real requests over gRPC:

1. three tasks over one long document (summarize, classify, answer a question): the first pays
   the full prefill, the next two reuse the document's blocks;
2. a multi-turn chat about the document in a session; during the second turn the worker serving
   it is killed, and the gateway resumes the stream on the other worker from the stored blocks;
3. a last turn, which the surviving worker serves from its own memory;
4. a bounded session (transformers engine only: `--engine vllm` has no bounded cache).

`--engine vllm` (after `make vllm`) runs the same workload on workers whose engine is vLLM with
kvpool's connector (docs/vllm.md, "vLLM as the engine").

It prints each answer as it streams, then a table of time to first token against the cold run,
with the cached tokens by tier, and shuts everything down.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvpool.config import env_default
from workers.api import WorkerConfig

DEFAULT_DOCUMENT = "kv_caching_explained.txt"
SYSTEM = "You are a precise assistant. Answer from the document only, briefly."


def corpus_dirs() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    return [Path("/work/shared/corpus"), repo.parent / "shared" / "corpus", repo / "corpus"]


def load_corpus(document: Path | None = None) -> str:
    """The demo's document: `document`, else the default file from the shared corpus."""
    if document is not None:
        if not document.is_file():
            raise ValueError(f"--document {document} is not a readable file")
        return document.read_text(encoding="utf-8", errors="replace")
    for folder in corpus_dirs():
        path = folder / DEFAULT_DOCUMENT
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
    searched = ", ".join(str(d) for d in corpus_dirs())
    raise ValueError(f"no {DEFAULT_DOCUMENT} in {searched}; pass --document PATH")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=env_default("--model", WorkerConfig().model))
    parser.add_argument("--codec", default=env_default("--codec", WorkerConfig().codec))
    parser.add_argument(
        "--engine",
        default=env_default("--engine", WorkerConfig().engine),
        choices=("transformers", "vllm"),
        help="the workers' engine (default transformers; vllm needs `make vllm`)",
    )
    parser.add_argument("--document", type=Path, default=None, help="a text file to work on")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per answer (default 32)")


@dataclass(frozen=True, slots=True)
class Row:
    step: str
    worker: str
    prompt_tokens: int
    local: int
    node: int
    store: int
    ttft_ms: float
    failovers: int


def run(args: argparse.Namespace) -> int:
    document = load_corpus(args.document)
    # gRPC's C core logs every fork Ray makes at INFO; only errors are worth showing here.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.max_new_tokens < 8:
        raise ValueError(f"--max-new-tokens must be >= 8 for the demo, got {args.max_new_tokens}")
    import logging

    logging.basicConfig(level=logging.ERROR)
    import ray

    from services.stack import local_stack
    from workers.api import WorkerConfig

    started = time.perf_counter()
    say(f"starting the store, a local Ray cluster and 2 workers ({args.model}, {args.codec}, "
        f"{args.engine} engine)...")  # fmt: skip
    rows: list[Row] = []
    worker = WorkerConfig(model=args.model, codec=args.codec, engine=args.engine)
    with local_stack(worker, workers=2, grace_s=5.0) as stack:
        say(f"ready in {time.perf_counter() - started:.0f} s; gateway on {stack.gateway.target}\n")
        n = args.max_new_tokens

        sessions: set[str] = set()

        def ask(
            step: str,
            question: str,
            *,
            session_id: str = "",
            kill_after: int | None = None,
            max_cache_tokens: int | None = None,
        ) -> None:
            # A new conversation starts with the system prompt and the document, so every task
            # and the chat's first turn share that prefix; later turns send only the question.
            new = session_id not in sessions
            if session_id:
                sessions.add(session_id)
            messages = [{"role": "user", "content": question}]
            if new:
                messages = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Document:\n{document}\n\n{question}"},
                ]
            say(f"## {step}\n> {question}")
            text_started = False
            killed = None
            tokens = 0
            last = None
            with stack.client() as client:
                stream = client.stream(
                    messages=messages, max_new_tokens=n, session_id=session_id,
                    max_cache_tokens=max_cache_tokens,
                )  # fmt: skip
                for chunk in stream:
                    if chunk.text:
                        sys.stdout.write(chunk.text if text_started else chunk.text.lstrip())
                        sys.stdout.flush()
                        text_started = True
                    tokens += len(chunk.token_ids)
                    if kill_after is not None and killed is None and tokens >= kill_after:
                        killed = busy_worker(stack)
                        ray.kill(stack.gateway.pool.handle(killed), no_restart=True)
                        sys.stdout.write(f" [worker {killed} killed] ")
                        sys.stdout.flush()
                    last = chunk
            u = last.usage
            evicted = f", {u.evicted_tokens} evicted" if u.evicted_tokens else ""
            say(f"\n   (worker {u.worker}, {u.prompt_tokens} prompt tokens, {u.cached_tokens} "
                f"cached{evicted}, first token after {u.ttft_ms:.0f} ms)\n")  # fmt: skip
            rows.append(
                Row(step, u.worker, u.prompt_tokens, u.cached_tokens_by_tier.local,
                    u.cached_tokens_by_tier.node, u.cached_tokens_by_tier.store, u.ttft_ms,
                    u.failovers)
            )  # fmt: skip

        ask("summarize (cold: nothing cached yet)", "Summarize the document in two sentences.")
        stack.flush()
        ask("classify", "Classify the document: is it a tutorial, news, or a research paper?")
        ask("answer a question", "According to the document, what does KV caching avoid?")
        ask("chat, turn 1", "What are the prerequisites the document lists?", session_id="demo")
        stack.flush()
        ask(
            "chat, turn 2 (its worker is killed mid-answer)",
            "Which of them matters most, and why?",
            kill_after=4,
            session_id="demo",
        )
        stack.flush()
        ask("chat, turn 3", "Say that again in one short sentence.", session_id="demo")
        if args.engine == "vllm":  # vLLM's engine has no bounded cache: it refuses the request
            say("(the bounded session is skipped: the vllm engine has no bounded cache)\n")
        else:
            bounded_session(ask, stack)
        print_table(rows)
        say(f"\nshutting down (the demo took {time.perf_counter() - started:.0f} s)")
    say("done")
    return 0


def bounded_session(ask, stack) -> None:
    """Two turns of a session whose cache is bounded (transformers engine only)."""
    # A bounded session: its cache keeps 4 sink tokens and the most recent ones, at most 512,
    # however long it runs; its next turn rebuilds that state from the store on any worker.
    ask(
        "bounded chat, turn 1 (cache bounded to 512 tokens)",
        "List three facts from the document.",
        session_id="bounded",
        max_cache_tokens=512,
    )
    stack.flush()
    ask("bounded chat, turn 2", "Which fact is the most surprising?", session_id="bounded")


def busy_worker(stack) -> str:
    router = stack.gateway.pool.router
    busy = [w for w in router.workers() if router.in_flight(w)]
    if len(busy) != 1:
        raise RuntimeError(f"expected one busy worker, found {busy}")
    return busy[0]


def print_table(rows: list[Row]) -> None:
    cold = rows[0].ttft_ms
    header = ("step", "worker", "prompt", "cached L1", "node", "store", "TTFT ms", "vs cold")
    lines = [header]
    for r in rows:
        speedup = "1.0x (miss)" if r is rows[0] else f"{cold / r.ttft_ms:.1f}x faster"
        note = f" (+{r.failovers} failover)" if r.failovers else ""
        lines.append(
            (r.step.split(" (")[0] + note, r.worker, str(r.prompt_tokens), str(r.local),
             str(r.node), str(r.store), f"{r.ttft_ms:.0f}", speedup)
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    say("\nTime to first token, miss vs hit (cached tokens by tier: L1 = the worker's memory, "
        "node = its node's shared tier, store = fetched from the KVStore):")  # fmt: skip
    for i, line in enumerate(lines):
        say("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if i == 0:
            say("  " + "  ".join("-" * w for w in widths))


def say(text: str) -> None:
    print(text, flush=True)
