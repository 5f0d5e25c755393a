"""`kvpool bench hitpath` on the tiny model: the rows' contract, over an unshaped and (where a
network namespace can be made) a shaped link, and bad flags."""

import json

import pytest

from kvpool.bench.link import unavailable
from kvpool.cli import main

ROW_KEYS = {
    "link_mbps",
    "prompt_tokens",
    "tier",
    "miss_ms",
    "fetch_ms",
    "auto_ms",
    "plan",
    "recomputed_tokens",
}


def bench(tmp_path, rates: str) -> dict:
    out, plot = tmp_path / "hitpath.json", tmp_path / "hitpath.png"
    argv = ["bench", "hitpath", "--model", "tiny-random", "--codec", "fp16", "--block-tokens", "16"]
    argv += ["--lengths", "96", "--link-mbps", rates, "--repeats", "1"]
    argv += ["--json", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    assert plot.stat().st_size > 0
    return json.loads(out.read_text())


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_rows_cover_each_rate_and_tier_with_the_contract_keys(tmp_path):
    result = bench(tmp_path, "0,20")
    assert result["link"].startswith("tc htb")
    rows = result["rows"]
    assert {(r["link_mbps"], r["tier"]) for r in rows} == {
        (0.0, "node"), (0.0, "store"), (20.0, "node"), (20.0, "store"),
    }  # fmt: skip
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["plan"] in ("fetch", "recompute", "split")
        assert row["fetch_cached_tokens"] == 95  # the forced fetch took the whole prefix
    for key in ("memcpy_gbps", "node_tier_gbps", "store_gbps"):
        assert result[key] > 0
    codecs = {r["codec"]: r for r in result["break_even"]}
    assert codecs["int8"]["break_even_gbps"] < codecs["fp16"]["break_even_gbps"]


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    base = ["bench", "hitpath", "--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x")]
    assert main([*base, "--link-mbps", "fast"]) == 2
    assert "--link-mbps takes comma-separated numbers" in capsys.readouterr().err
    assert main([*base, "--lengths", "1"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main([*base, "--prefill-tokens-per-s", "0"]) == 2
