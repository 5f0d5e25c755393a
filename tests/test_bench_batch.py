"""`kvpool bench batch` on the tiny model: the rows' contract, exact agreement, and bad flags.

It runs in this process through `kvpool.cli.main`.
"""

import json

import pytest

from kvpool.cli import main


def test_rows_have_the_contract_keys_and_batched_output_equals_solo(tmp_path):
    out, plot = tmp_path / "batch.json", tmp_path / "batch.png"
    code = main(
        ["bench", "batch", "--model", "tiny-random", "--codec", "fp16", "--block-tokens", "16",
         "--concurrency", "1,4", "--requests", "6", "--max-new-tokens", "12",
         "--prompt-tokens", "40", "--json", str(out), "--plot", str(plot)]
    )  # fmt: skip
    assert code == 0
    assert plot.stat().st_size > 0
    result = json.loads(out.read_text())
    assert result["max_batch"] == 4 and result["model"] == "tiny-random"
    rows = {r["concurrency"]: r for r in result["rows"]}
    assert set(rows) == {1, 4}
    for row in rows.values():
        assert row["tokens"] == 6 * 12
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] > 0 and row["tpot_ms"] > 0
        # tiny-random: a batched greedy sequence is exactly its solo self
        assert row["identical_sequences"] == 6 and row["token_agreement"] == 1.0
    assert rows[1]["speedup"] == 1.0 and rows[1]["largest_batch"] == 1
    assert 2 <= rows[4]["largest_batch"] <= 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "0,2"], "--concurrency"),
        (["--requests", "0"], "--requests"),
        (["--max-batch", "4", "--max-batch-tokens", "4"], "max_batch_tokens"),
    ],
)
def test_bad_flags_are_clear_errors(tmp_path, capsys, flags, message):
    argv = ["bench", "batch", "--model", "tiny-random", "--json", str(tmp_path / "b.json"),
            "--plot", str(tmp_path / "b.png"), *flags]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
