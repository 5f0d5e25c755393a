"""docs/deploy.md's Redis sizing tables, recomputed from the codecs' own layouts.

The KV bytes per token of each (model, codec) pair is the payload of one encoded block divided by
its tokens, exactly as `workers.kv.codec` lays it out (sections aligned to 8 bytes), so the docs
cannot drift from the format.
"""

import re
from pathlib import Path

import pytest

from workers.kv.codec import get_codec
from workers.kv.geometry import KVGeometry

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
BLOCK_TOKENS = 64
MODELS = {
    "SmolLM2-135M": KVGeometry(num_layers=30, num_kv_heads=3, head_dim=64),
    "Llama-3-8B": KVGeometry(num_layers=32, num_kv_heads=8, head_dim=128),
    "Qwen2.5-7B": KVGeometry(num_layers=28, num_kv_heads=4, head_dim=128),
}
# Table columns: each lists codecs that share a size.
COLUMNS = (("fp16", "bf16"), ("int8", "fp8"), ("int4",), ("int4-g64",))


def payload_bytes_per_token(geometry: KVGeometry, codec: str) -> float:
    offset = 0
    for section in get_codec(codec).layout(geometry.block_shape(BLOCK_TOKENS)):
        offset = -(-offset // 8) * 8 + section.nbytes
    return offset / BLOCK_TOKENS


def table_rows(heading: str) -> dict[str, list[str]]:
    """The rows of the first table after the first line containing `heading`."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if heading in line)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in MODELS:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(MODELS), f"table after {heading!r} lists {sorted(rows)}"
    return rows


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bytes_per_token_table(model):
    row = table_rows("Payload bytes per token")[model]
    geometry = MODELS[model]
    assert row[0] == " x ".join(
        str(n) for n in (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    )
    assert int(row[1].replace(",", "")) == geometry.fp16_bytes_per_token
    for cell, codecs in zip(row[1:], COLUMNS, strict=True):
        for codec in codecs:
            assert float(cell.replace(",", "")) == payload_bytes_per_token(geometry, codec), codec


@pytest.mark.parametrize("model", sorted(MODELS))
def test_gb_per_million_tokens_table(model):
    row = table_rows("The same as GB")[model]
    for cell, codecs in zip(row, COLUMNS, strict=True):
        expected = payload_bytes_per_token(MODELS[model], codecs[0]) * 1e6 / 1e9
        assert float(cell) == pytest.approx(expected, abs=0.005), codecs


def test_worked_examples():
    text = re.sub(r"\s+", " ", DOC.read_text())
    int8 = payload_bytes_per_token(MODELS["SmolLM2-135M"], "int8")
    assert f"8 x 2^30 / {int8:,.0f} = {round(8 * 2**30 / int8, -3):,.0f} tokens" in text
    llama = {c: payload_bytes_per_token(MODELS["Llama-3-8B"], c) for c in ("int8", "fp16", "int4")}
    assert (
        f"64,000 tokens x {llama['int8']:,.0f} x 1.1 = {64_000 * llama['int8'] * 1.1 / 1e9:.1f} GB"
        in text
    )
    assert f"need {64_000 * llama['fp16'] * 1.1 / 1e9:.1f} GB" in text
    assert f"with int4 {64_000 * llama['int4'] * 1.1 / 1e9:.1f} GB" in text
    qwen = payload_bytes_per_token(MODELS["Qwen2.5-7B"], "int4")
    assert f"1,000,000 tokens x {qwen:,.0f} x 1.1 = {1e6 * qwen * 1.1 / 1e9:.1f} GB" in text


@pytest.mark.parametrize("model", sorted(MODELS))
def test_blocks_per_gb_per_node_table(model):
    row = table_rows("Blocks of 64 tokens per GB")[model]
    for cell, codecs in zip(row, COLUMNS, strict=True):
        bytes_per_block = payload_bytes_per_token(MODELS[model], codecs[0]) * BLOCK_TOKENS * 1.1
        assert int(cell.replace(",", "")) == round(1e9 / bytes_per_block), codecs
