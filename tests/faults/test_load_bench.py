"""`kvpool bench load` against the running stack: a short run with shared prefixes gets hits and
no errors, and failed requests are counted by status code (and fail the command)."""

import json

import pytest

from kvpool.bench.load_report import Record, percentile, summarize
from kvpool.cli import main

pytestmark = pytest.mark.integration


def bench(stack, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "load.json"
    argv = ["bench", "load", "--target", stack.gateway.target, "--clients", "3"]
    argv += ["--duration", "3", "--prompt-tokens", "64", "--documents", "2"]
    argv += ["--max-new-tokens", "2", "--json", str(out), "--plot", str(tmp_path / "load.png")]
    status = main([*argv, *extra])
    return status, json.loads(out.read_text())


def test_a_short_load_run_gets_hits_and_no_errors(stack, tmp_path):
    status, result = bench(stack, tmp_path)
    summary = result["summary"]
    assert status == 0 and summary["errors"] == 0 and summary["errors_by_code"] == {}
    assert summary["requests"] == len(result["requests"]) >= 3
    assert summary["requests_per_s"] > 0 and summary["ttft_ms"]["p50"] > 0
    # Two documents over many requests: all but (at most) each document's first request hit.
    assert summary["requests_with_hit"] > 0.5 and 0 < summary["hit_rate_tokens"] < 1
    assert summary["hit_rate_tokens_by_tier"]["local"] == 0  # the fault stack runs without L1
    assert (tmp_path / "load.png").stat().st_size > 0
    assert sum(row["completed"] for row in result["timeline"]) == summary["requests"]


def test_failed_requests_are_counted_by_code_and_fail_the_command(stack, tmp_path):
    status, result = bench(stack, tmp_path, "--max-new-tokens", "5000")
    summary = result["summary"]
    assert status == 1 and summary["requests"] == 0
    assert summary["errors"] == len(result["requests"]) > 0
    assert set(summary["errors_by_code"]) == {"INVALID_ARGUMENT"}
    assert "max_new_tokens must be between 1 and 4096" in summary["error_examples"][0]


def test_summary_figures():
    ok = [
        Record(0, 0, float(i), float(i) + 2.0, "OK", ttft_ms=100.0 * (i + 1), prompt_tokens=100,
               cached_store_tokens=64 if i else 0, completion_tokens=4, worker="w")
        for i in range(4)
    ]  # fmt: skip
    failed = [Record(1, 0, 1.0, 1.5, "UNAVAILABLE", detail="no live worker")]
    s = summarize([*ok, *failed], duration_s=4.0)
    assert (s["requests"], s["errors"], s["errors_by_code"]) == (4, 1, {"UNAVAILABLE": 1})
    assert s["requests_per_s"] == 4 / 5.0  # the last request ended at 5 s
    assert s["ttft_ms"]["p50"] == 250.0 and s["ttft_ms"]["miss_p50"] == 100.0
    assert s["hit_rate_tokens"] == 3 * 64 / 400 and s["requests_with_hit"] == 0.75
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([], 50) is None


def test_abuse_mode_keeps_well_behaved_clients_error_free(stack, tmp_path):
    """Hostile clients beside the load: they get their refusals, the others get no error, and
    no worker is lost."""
    status, result = bench(
        stack, tmp_path, "--abuse", "--abuse-clients", "2", "--store", stack.store.target
    )
    summary, hostile = result["summary"], result["abuse"]["by_kind"]
    assert status == 0 and summary["errors"] == 0 and summary["requests"] > 0
    assert result["workers_lost"] is None  # --target without --gateway-metrics: not known here
    assert hostile["oversized_bounded_prompt"]["codes"] == {"INVALID_ARGUMENT": hostile[
        "oversized_bounded_prompt"]["requests"]}  # fmt: skip
    assert set(hostile["stop_flood"]["codes"]) == {"INVALID_ARGUMENT"}
