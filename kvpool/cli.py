"""The `kvpool` command line.

Each command lives in its own module, which defines `configure(parser)` and `run(args) -> int`.
Command modules import heavy libraries (torch, grpc, ray) inside `run`, so `kvpool --help` and a
bad flag answer at once.

Errors the user can fix (`KvpoolError`, `ValueError`) are printed as one line on stderr with exit
status 2; they never show a traceback.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvpool.errors import KvpoolError

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (
        ("generate",),
        "kvpool.commands.generate",
        "generate text, in-process (--local) or via a gateway",
    ),
    (("serve",), "kvpool.commands.serve", "run store, gateway and workers in one command"),
    (("demo",), "kvpool.commands.demo", "run the embedded stack on a prefix-sharing workload"),
    (("model", "prepare"), "kvpool.commands.model", "convert and cache a model for fast loads"),
    (("store", "serve"), "services.store.cli", "run the KVStore gRPC service"),
    (("gateway", "serve"), "services.gateway.cli", "run the Inference gateway gRPC service"),
    (("bench", "decode"), "kvpool.bench.decode", "decode speed with and without the KV cache"),
    (("bench", "codec"), "kvpool.bench.codec", "codec size, speed and accuracy on real text"),
    (("bench", "store"), "kvpool.bench.store", "KVStore throughput against raw redis-py"),
    (("bench", "ttft"), "kvpool.bench.ttft", "time to first token: miss, store hit, local hit"),
    (("bench", "load"), "kvpool.bench.load", "concurrent clients against a running stack"),
    (
        ("bench", "hitpath"),
        "kvpool.bench.hitpath",
        "cache hit vs recompute: node tier, store, fetch plan, over shaped links",
    ),
    (("bench", "vllm"), "kvpool.bench.vllm", "vLLM engines sharing a prompt through kvpool"),
    (
        ("bench", "vllm-serve"),
        "kvpool.bench.vllm_serve",
        "vLLM's load generator against kvpool serve and vllm serve with and without the connector",
    ),
    (("bench", "window"), "kvpool.bench.window", "bounded cache with and without sinks vs full"),
    (
        ("bench", "batch"),
        "kvpool.bench.batch",
        "continuous batching: tokens/s, TTFT and time per token by concurrency",
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpool", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                group_parser = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group_parser.add_subparsers(
                    dest=f"{words[0]}_command", metavar="SUBCOMMAND", required=True
                )
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (KvpoolError, ValueError) as exc:
        print(f"kvpool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
