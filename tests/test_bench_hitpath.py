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


def bench(tmp_path, rates: str | None, *extra: str) -> dict:
    out, plot = tmp_path / "hitpath.json", tmp_path / "hitpath.png"
    argv = ["bench", "hitpath", "--model", "tiny-random", "--codec", "fp16", "--block-tokens", "16"]
    argv += ["--lengths", "96", "--repeats", "1", *extra]
    if rates is not None:
        argv += ["--link-mbps", rates]
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
    assert codecs["int8"]["break_even_mbit_s"] < codecs["fp16"]["break_even_mbit_s"]


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_without_rates_the_link_is_shaped_around_the_measured_break_even(tmp_path):
    """Issue 26: the rates come from this machine's own prefill, on both sides of the crossover."""
    result = bench(tmp_path, None, "--rate-factors", "0.5,2")
    (derived,) = result["derived"]
    # 95 tokens, 80 of them in full blocks of 16: the fetch would move their fp16 KV.
    assert derived["cached_tokens"] == 80
    assert derived["kv_bytes"] > 0 and derived["miss_ms"] > 0
    expected = derived["kv_bytes"] * 8 / (derived["miss_ms"] / 1000) / 1e6
    assert derived["break_even_mbit_s"] == pytest.approx(expected, rel=0.01)
    half, double = (max(0.1, round(f * derived["break_even_mbit_s"], 1)) for f in (0.5, 2))
    assert derived["link_mbps"] == [
        0.0,
        pytest.approx(half, abs=0.11),
        pytest.approx(double, abs=0.11),
    ]
    store_rows = {r["link_mbps"]: r for r in result["rows"] if r["tier"] == "store"}
    assert set(store_rows) == set(derived["link_mbps"])
    factors = sorted(r["rate_factor"] for r in store_rows.values() if r["rate_factor"])
    assert factors == [pytest.approx(0.5, rel=0.1), pytest.approx(2, rel=0.1)]
    # The break-even table per codec uses the prefill rate measured here.
    assert {r["prefill_tokens_per_s"] for r in result["break_even"]} == {
        derived["prefill_tokens_per_s"]
    }
    assert result["auto"]["rows"] == len(result["rows"])


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    base = ["bench", "hitpath", "--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x")]
    assert main([*base, "--link-mbps", "fast"]) == 2
    assert "--link-mbps takes comma-separated numbers" in capsys.readouterr().err
    assert main([*base, "--lengths", "1"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main([*base, "--prefill-tokens-per-s", "0"]) == 2
    assert main([*base, "--rate-factors", "0,1"]) == 2
    assert "--rate-factors takes numbers > 0" in capsys.readouterr().err
