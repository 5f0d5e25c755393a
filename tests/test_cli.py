"""The CLI as a user meets it: real subprocesses, messages instead of tracebacks."""

import json
import subprocess
import sys

import pytest


def kvpool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvpool.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "", "--model", "tiny-random"], "prompt is empty"),
        (["generate", "hi", "--model", "tiny-random", "--max-new-tokens", "0"], "between 1 and"),
        (["generate", "hi", "--model", "tiny-random", "--max-new-tokens", "-5"], "between 1 and"),
        (
            ["generate", "hi", "--model", "tiny-random", "--max-new-tokens", "999999"],
            "between 1 and",
        ),
        (
            ["generate", "hi", "--model", "no-such-model"],
            "use one of ('smollm2-135m', 'tiny-random')",
        ),
        (["generate", "hi", "--model", "tiny-random", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--session", "s1"], "--session and --tenant need a gateway"),
        (
            ["generate", "hi", "--model", "tiny-random", "--max-cache-tokens", "100"],
            "it must be at least sink_tokens + 2 x block_tokens = 132",
        ),
        (
            [
                "generate",
                "hi",
                "--model",
                "tiny-random",
                "--max-cache-tokens",
                "256",
                "--sink-tokens",
                "-1",
            ],
            "sink_tokens must be 0 (no sinks) or positive",
        ),
        (
            ["gateway", "serve", "--store", "127.0.0.1:1", "--max-cache-tokens", "100"],
            "--max-cache-tokens/--sink-tokens: max_cache_tokens=100 is too small",
        ),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(args, message):
    proc = kvpool(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_generate_local_json_has_the_contract_fields():
    proc = kvpool(
        "generate",
        "Hello there",
        "--local",
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "usage"}
    assert set(out["usage"]) >= {
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "ttft_ms",
        "tokens_per_s",
    }
    assert len(out["token_ids"]) == out["usage"]["completion_tokens"] <= 6
    assert out["finish_reason"] in ("length", "eos", "stop")


def test_generate_streams_text_then_usage_on_stderr():
    proc = kvpool(
        "generate",
        "Hello there",
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "6",
        "--no-cache",
        "--seed",
        "1",
        "--temperature",
        "0.7",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "completion=" in proc.stderr


def test_help_lists_the_commands():
    proc = kvpool("--help")
    assert proc.returncode == 0
    for command in ("generate", "bench"):
        assert command in proc.stdout


def test_generate_local_with_a_bounded_cache_reports_evicted_tokens():
    proc = kvpool(
        "generate", "A bounded cache. " * 60, "--local", "--raw", "--model", "tiny-random",
        "--max-new-tokens", "8", "--max-cache-tokens", "132", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    usage = json.loads(proc.stdout)["usage"]
    # Evicted at block boundaries (64 tokens) down to 132 - 64 = 68 kept; 7 outputs were fed.
    fed = usage["prompt_tokens"] + 7
    assert fed > 132 + 64  # at least two evictions
    assert usage["evicted_tokens"] == fed // 64 * 64 - 68
