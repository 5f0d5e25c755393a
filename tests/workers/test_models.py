import copy

import pytest
import torch

from kvpool.errors import InvalidArgument
from workers.models import fingerprint_model, kv_geometry, load_model, pick_device


def test_tiny_random_is_seeded_and_identical_across_loads(tiny):
    again = load_model("tiny-random", device="cpu")
    assert again.fingerprint == tiny.fingerprint
    for (name, a), (_, b) in zip(
        tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_fingerprint_changes_with_any_weight(tiny):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert fingerprint_model(model) != tiny.fingerprint


def test_fingerprint_changes_with_config(tiny):
    model = copy.deepcopy(tiny.model)
    model.config.rms_norm_eps = model.config.rms_norm_eps * 2
    assert fingerprint_model(model) != tiny.fingerprint


def test_tiny_geometry(tiny):
    g = tiny.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype) == (2, 2, 16, "float32")
    assert g.bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert kv_geometry(tiny.model) == g


@pytest.mark.model
def test_smollm2_geometry_and_fingerprint(smollm2):
    g = smollm2.geometry
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (30, 3, 64)
    # docs/design.md: 23 KB per token at fp16
    assert g.fp16_bytes_per_token == 23_040
    assert smollm2.max_context == 8192
    assert len(smollm2.fingerprint) == 64
    assert smollm2.fingerprint == load_model("smollm2-135m", device="cpu").fingerprint


def test_pick_device_is_chosen_at_run_time():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="CUDA is not available"):
            pick_device("cuda")


@pytest.mark.parametrize("name", ["", "bogus", "no such/model/x"])
def test_unknown_model_names_the_allowed_values(name):
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        load_model(name)
    assert "tiny-random" in str(info.value)


def test_local_model_folder_loads(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.geometry == tiny.geometry


def test_racing_conversions_leave_one_complete_copy(tmp_path, monkeypatch):
    """Several processes converting on a fresh cache at once: every one of them succeeds."""
    import subprocess
    import sys

    monkeypatch.setenv("KVPOOL_CACHE_DIR", str(tmp_path))
    code = (
        "from workers.models import _smollm2_tokenizer, smollm2_cache_path\n"
        "assert len(_smollm2_tokenizer()) > 1000\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
