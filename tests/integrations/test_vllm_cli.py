"""vLLM's own CLI runs from `make vllm`'s venv: the README's `vllm serve` line and
`kvpool bench vllm-serve` need `vllm` to find its version and its CPU platform."""

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

VLLM = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "vllm"


def test_the_vllm_cli_starts_on_the_cpu_build():
    done = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0.32.0+cpu"
