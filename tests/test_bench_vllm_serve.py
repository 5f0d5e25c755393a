"""`kvpool bench vllm-serve`'s own parts: the servers it starts and the rows it takes (the bench
itself runs vLLM servers for minutes, so its figures come from `kvpool bench`, not a test)."""

import json
from pathlib import Path

import pytest

from kvpool.bench import vllm_serve
from kvpool.cli import main


def test_each_row_starts_the_server_it_names():
    vllm, model = Path("/v/bin/vllm"), Path("/models/m")
    kvpool = vllm_serve._server_argv("kvpool", vllm, model, 8001, None, "int8")
    assert kvpool[1:2] == ["serve"] and kvpool[kvpool.index("--http-port") + 1] == "8001"
    assert "--workers" in kvpool and kvpool[kvpool.index("--workers") + 1] == "1"
    plain = vllm_serve._server_argv("vllm", vllm, model, 8002, None, "int8")
    assert plain[:3] == [str(vllm), "serve", str(model)] and "--kv-transfer-config" not in plain
    assert "--enable-prefix-caching" in plain and "--kv-cache-memory-bytes" in plain
    cold = vllm_serve._server_argv("vllm_connector_cold", vllm, model, 8003, "h:1", "raw")
    config = json.loads(cold[cold.index("--kv-transfer-config") + 1])
    assert config["kv_connector"] == "KVPoolConnector"
    assert config["kv_connector_module_path"] == "kvpool.integrations.vllm"
    assert config["kv_connector_extra_config"] == {"store": "h:1", "codec": "raw"}


def test_an_unknown_row_is_refused_with_the_ones_there_are(tmp_path, capsys):
    argv = ["bench", "vllm-serve", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png"), "--rows", "vllm,sglang",
            "--vllm-venv", str(Path(__file__).resolve().parents[1] / ".venv-vllm")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--rows takes some of kvpool, vllm, vllm_connector_cold, vllm_connector_warm" in err
    assert "Traceback" not in err


def test_a_missing_vllm_venv_says_how_to_make_it(tmp_path, capsys):
    argv = ["bench", "vllm-serve", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png"), "--vllm-venv", str(tmp_path / "none")]  # fmt: skip
    assert main(argv) == 2
    assert "run `make vllm` first" in capsys.readouterr().err


@pytest.mark.parametrize("row", vllm_serve.ROWS)
def test_every_row_has_a_server(row):
    assert vllm_serve._server_argv(row, Path("v"), Path("m"), 1, "h:1", "int8")


def test_the_engine_benches_take_one_engine_or_several_side_by_side():
    from kvpool.bench.engines import parse_engines

    assert parse_engines("vllm") == ["vllm"]
    assert parse_engines("transformers, vllm") == ["transformers", "vllm"]
    for bad in ("", "sglang", "vllm,vllm"):
        with pytest.raises(ValueError, match="--engine takes one or more of transformers, vllm"):
            parse_engines(bad)
