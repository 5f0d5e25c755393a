"""`kvpool serve --http-port` as a user runs it: a real subprocess, the `openai` package as client.

tiny-random for speed; SmolLM2 for one real-text case: the same greedy reply through gRPC and
HTTP, and a shared system prompt served from the cache. SIGTERM stops the process cleanly.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from services.gateway.client import InferenceClient

pytestmark = pytest.mark.integration

SYSTEM = (
    "You are a concise assistant for an inference team. You answer questions about caching "
    "attention keys and values, about routing requests to workers, and about block sizes. "
) * 3


@pytest.fixture
def serve(free_port, tmp_path):
    """`serve(model)`: `kvpool serve` with the HTTP API on: (process, gRPC target, HTTP port)."""
    procs: list[subprocess.Popen] = []

    def start(model: str) -> tuple[subprocess.Popen, str, int]:
        port, store_port, http_port = free_port(), free_port(), free_port()
        env = {**os.environ, "KVPOOL_HTTP_PORT": str(http_port)}  # the env var, as compose sets it
        env.pop("RAY_ADDRESS", None)
        argv = [sys.executable, "-m", "kvpool.cli", "serve", "--model", model, "--workers", "1",
                "--host", "127.0.0.1", "--port", str(port), "--store-port", str(store_port),
                "--worker-gpus", "0", "--grace", "5", "--log-level", "WARNING"]  # fmt: skip
        log = open(tmp_path / f"serve-{len(procs)}.log", "wb")  # noqa: SIM115 (the process's)
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"kvpool serve exited: {Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2).status_code == 200:
                    return proc, f"127.0.0.1:{port}", http_port
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"kvpool serve's HTTP API did not come up in 240 s: "
                    f"{Path(log.name).read_text()[-3000:]}"
                )
            time.sleep(0.5)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _stops_on_sigterm(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.mark.parametrize(
    "model", ["tiny-random", pytest.param("smollm2-135m", marks=pytest.mark.model)]
)
def test_kvpool_serve_answers_the_openai_sdk_as_grpc_does(serve, model):
    proc, target, http_port = serve(model)
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=300
    )
    assert [m.id for m in api.models.list().data] == [model]

    def ask(question: str):
        return api.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
        )

    first = ask("What is a KV cache?")
    second = ask("Why do blocks have a fixed size?")
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens

    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    with InferenceClient(target, timeout_s=300) as grpc_client:
        grpc = grpc_client.generate(messages=messages, max_new_tokens=16)
    assert first.choices[0].message.content == grpc.text
    if model != "tiny-random":
        assert grpc.text.strip()  # real text, not tiny-random's noise

    streamed = api.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == grpc.text
    api.close()
    _stops_on_sigterm(proc)
