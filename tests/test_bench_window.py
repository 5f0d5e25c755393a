"""`kvpool bench window` on the tiny model: the rows' contract, bounded memory, and bad flags.

It runs in this process through `kvpool.cli.main`, so torch is imported once for both tests.
"""

import json

import pytest

from kvpool.cli import main

MAX_CACHE_TOKENS = 52


def test_rows_have_the_contract_keys_and_windowed_memory_is_bounded(tmp_path):
    out, plot = tmp_path / "window.json", tmp_path / "window.png"
    code = main(
        [
            "bench",
            "window",
            "--model",
            "tiny-random",
            "--tokens",
            "200",
            "--max-cache-tokens",
            str(MAX_CACHE_TOKENS),
            "--sink-tokens",
            "4",
            "--block-tokens",
            "16",
            "--bucket-tokens",
            "64",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    assert plot.stat().st_size > 0
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["full", "sinks", "window"]
    for row in rows.values():
        assert set(row) >= {"mode", "window", "perplexity", "peak_kv_bytes", "tokens_per_s"}
        assert row["perplexity"] > 1 and row["tokens_per_s"] > 0
        assert [b["start"] for b in row["by_position"]] == [1, 64, 128, 192]
    full = rows["full"]
    assert full["window"] is None and full["evicted_tokens"] == 0
    assert full["peak_kv_bytes"] == 199 * full["kv_bytes_per_token"]  # every fed token kept
    bound = MAX_CACHE_TOKENS * full["kv_bytes_per_token"]
    for mode in ("sinks", "window"):
        assert rows[mode]["window"] == MAX_CACHE_TOKENS
        assert rows[mode]["peak_kv_bytes"] == bound < full["peak_kv_bytes"]
        assert rows[mode]["evicted_tokens"] > 0
    assert {"sinks_over_full", "sinks_within_10pct", "window_over_full"} <= set(result["target"])
    assert "environment" in result


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-cache-tokens", "30", "--block-tokens", "16"], "max_cache_tokens=30 is too small"),
        (["--sink-tokens", "-1"], "sink_tokens must be 0 (no sinks) or positive"),
        (["--block-tokens", "0"], "block_tokens must be >= 1"),
        (["--tokens", "100"], "--tokens (100) must exceed --max-cache-tokens (256)"),
        (["--tokens", "-5"], "--tokens must be >= 2"),
    ],
)
def test_bad_flags_are_a_message_not_a_traceback(tmp_path, capsys, flags, message):
    out = tmp_path / "w.json"
    args = ["bench", "window", "--model", "tiny-random", "--json", str(out), "--plot", "w.png"]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpool: error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists()
