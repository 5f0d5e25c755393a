"""`kvpool bench store` runs end to end and writes the documented JSON (not a timing test)."""

import json

import pytest

from kvpool.cli import main

pytestmark = pytest.mark.integration

ROW_KEYS = {
    "value_bytes",
    "put_gbps",
    "get_gbps",
    "redis_set_gbps",
    "redis_get_gbps",
    "put_ratio",
    "get_ratio",
    "put_p99_ms",
    "get_p99_ms",
    "get_client_cpu_s_per_gb",
    "get_store_cpu_s_per_gb",
    "put_client_cpu_s_per_gb",
    "put_store_cpu_s_per_gb",
    "redis_get_client_cpu_s_per_gb",
    "grpc_get_gbps",
    "grpc_get_ratio",
    "grpc_get_client_cpu_s_per_gb",
    "grpc_get_store_cpu_s_per_gb",
    "grpc_put_gbps",
    "grpc_put_ratio",
    "grpc_put_client_cpu_s_per_gb",
    "grpc_put_store_cpu_s_per_gb",
    "relayed_get_gbps",
    "relayed_get_ratio",
}


def test_bench_store_writes_rows_lookup_and_plot(tmp_path, redis_server):
    out, plot = tmp_path / "store.json", tmp_path / "store.png"
    argv = ["bench", "store", "--json", str(out), "--plot", str(plot), "--redis", redis_server]
    assert main([*argv, "--mib", "1", "--lookups", "20"]) == 0
    result = json.loads(out.read_text())
    assert [row["value_bytes"] for row in result["rows"]] == [64 << 10, 1 << 20, 4 << 20]
    for row in result["rows"]:
        assert set(row) >= ROW_KEYS
        # The store process's CPU for a data path Get or Put can be under one clock tick (it
        # splices the bytes, never reading them): zero. Every other figure is measured, so
        # positive.
        spliced = {"get_store_cpu_s_per_gb", "put_store_cpu_s_per_gb"}
        assert all(row[k] >= 0 for k in spliced)
        assert all(row[k] > 0 for k in ROW_KEYS - spliced)
    assert result["lookup_chain"] == 64 and result["lookup_p50_ms"] > 0
    assert result["grpc_lookup_p50_ms"] > 0
    # Aggregate Get of 1, 2 and 4 client processes at once, store and raw redis-py.
    assert [row["clients"] for row in result["aggregate_get"]] == [1, 2, 4]
    for row in result["aggregate_get"]:
        assert row["store_get_gbps"] > 0 and row["redis_get_gbps"] > 0
        assert row["ratio"] == pytest.approx(
            row["store_get_gbps"] / row["redis_get_gbps"], abs=0.01
        )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SCALING_KEYS = {
    "put_gbps",
    "get_gbps",
    "redis_set_gbps",
    "redis_get_gbps",
    "lookup_p50_ms",
    "lookup_p99_ms",
}


def test_bench_store_scaling_rows_per_backend_and_process_count(tmp_path):
    out, plot = tmp_path / "scaling.json", tmp_path / "scaling.png"
    argv = ["bench", "store", "--json", str(out), "--plot", str(plot), "--processes", "1,2"]
    assert main([*argv, "--cluster", "3", "--mib", "16", "--lookups", "10"]) == 0
    rows = json.loads(out.read_text())["scaling"]
    assert [(r["backend"], r["processes"]) for r in rows] == [
        ("redis", 1), ("redis", 2), ("cluster-3", 1), ("cluster-3", 2),
    ]  # fmt: skip
    for row in rows:
        assert all(row[k] > 0 for k in SCALING_KEYS) and row["lookup_chain"] == 64
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_store_scaling_flags_are_checked(tmp_path):
    argv = ["bench", "store", "--json", str(tmp_path / "x.json")]
    assert main([*argv, "--cluster", "2"]) == 2  # a cluster needs 3 masters
    with pytest.raises(SystemExit):
        main([*argv, "--processes", "1,zero"])


def test_bench_store_runs_the_sizes_asked_for(tmp_path, redis_server):
    out = tmp_path / "store.json"
    argv = ["bench", "store", "--json", str(out), "--redis", redis_server, "--clients", "1"]
    assert main([*argv, "--sizes", "64", "--mib", "1", "--lookups", "5"]) == 0
    result = json.loads(out.read_text())
    assert [row["value_bytes"] for row in result["rows"]] == [64 << 10]
    # What disturbed the run, from /proc (Linux): stolen CPU and TCP retransmissions.
    assert result["setup"]["steal_s"] >= 0 and result["setup"]["tcp_retransmitted_segments"] >= 0
    for bad in ("0", "64,x", ""):
        with pytest.raises(SystemExit):
            main([*argv, "--sizes", bad])
