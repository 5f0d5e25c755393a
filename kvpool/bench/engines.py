"""The `--engine` flag of the benches that run workers: one engine, or several side by side."""

import argparse

from workers.api import ENGINES, WorkerConfig


def add_engine_flag(parser: argparse.ArgumentParser, subject: str = "the workers'") -> None:
    parser.add_argument(
        "--engine",
        default=WorkerConfig().engine,
        help=f"{subject} engine, or several side by side in one run: transformers, vllm, or "
        "transformers,vllm (vllm needs `make vllm`)",
    )


def parse_engines(text: str) -> list[str]:
    """`transformers,vllm` -> the engines in the order given; each once, each a known one."""
    engines = [part.strip() for part in text.split(",") if part.strip()]
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) < len(engines):
        raise ValueError(
            f"--engine takes one or more of {', '.join(ENGINES)}, comma-separated, got {text!r}"
        )
    return engines
