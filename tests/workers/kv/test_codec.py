"""Codecs at the tensor level: registry, layouts, KIVI axes, refusal of unencodable values."""

import math

import pytest
import torch

from kvpool.errors import InvalidArgument
from tests.workers.kv.blocks import fixed_block
from workers.kv.codec import CODEC_NAMES, _group_size, _pack_nibbles, _unpack_nibbles, get_codec

SHAPE = (2, 2, 3, 64, 64)


def roundtrip(codec: str, kv: torch.Tensor) -> torch.Tensor:
    impl = get_codec(codec)
    return impl.decode(impl.encode(kv), torch.float32)  # [L, 2, H, T, D]


def test_registry_matches_the_hashed_names() -> None:
    assert [get_codec(name).name for name in CODEC_NAMES] == list(CODEC_NAMES)
    assert {"fp16", "bf16", "int8", "int4", "fp8"} <= set(CODEC_NAMES)


def test_unknown_codec_names_the_allowed_specs() -> None:
    with pytest.raises(InvalidArgument) as info:
        get_codec("int3")
    assert all(name in str(info.value) for name in CODEC_NAMES)
    with pytest.raises(InvalidArgument):
        get_codec(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_encode_matches_layout_and_leaves_input_alone(codec: str) -> None:
    kv = fixed_block(SHAPE)
    before = kv.clone()
    impl = get_codec(codec)
    sections = impl.encode(kv)
    layout = impl.layout(SHAPE)
    assert [(t.dtype, tuple(t.shape)) for t in sections] == [(s.dtype, s.shape) for s in layout]
    assert torch.equal(kv, before)  # float32 input is used without a copy: it must not be written
    assert impl.decode(sections, torch.float32).shape == SHAPE


def test_sizes_per_token() -> None:
    """Payload bytes per token of SmolLM2-like blocks (30 layers, 3 heads, head dim 64)."""
    shape = (30, 2, 3, 64, 64)
    fp16 = math.prod(shape) * 2
    ratios = {
        name: fp16 / sum(s.nbytes for s in get_codec(name).layout(shape)) for name in CODEC_NAMES
    }
    assert ratios["fp16"] == ratios["bf16"] == 1
    assert ratios["int8"] == pytest.approx(128 / 66)  # 1 byte + 2/64 scale bytes per value
    # 0.5 byte of codes per value, plus a float16 scale and zero (4 bytes) per group, for half
    # the values (K) groups of 32 tokens and for the other half (V) groups of 32 channels.
    assert ratios["int4-kivi"] == pytest.approx(2 / (0.5 + 4 / 32))  # 3.2
    assert ratios["int4-g64"] == pytest.approx(2 / (0.5 + 4 / 64))  # 3.56
    # int4: the same groups with an e4m3 scale and zero (2 bytes), plus two float16 units (4
    # bytes) per layer, K/V and head, whose 64 x 64 values they serve.
    assert ratios["int4"] == pytest.approx(2 / (0.5 + 2 / 32 + 4 / (64 * 64)))  # 3.55
    assert ratios["int4"] >= 3.5


def test_group_sizes_divide_the_block() -> None:
    assert _group_size(64, 32) == 32
    assert _group_size(16, 32) == 16
    assert _group_size(48, 32) == 24
    assert _group_size(7, 32) == 7
    assert get_codec("int4").params((1, 2, 1, 16, 80)) == {"k_group": 16, "v_group": 20}
    assert get_codec("int4-g64").params((1, 2, 1, 64, 64)) == {"k_group": 64, "v_group": 64}


@pytest.mark.parametrize("count", [1, 2, 7, 10])
def test_nibble_packing(count: int) -> None:
    codes = torch.arange(count, dtype=torch.uint8) % 16
    packed = _pack_nibbles(codes)
    assert packed.numel() == (count + 1) // 2
    assert int(packed[0]) == int(codes[0]) | (int(codes[1]) << 4 if count > 1 else 0)
    assert torch.equal(_unpack_nibbles(packed, count), codes)


@pytest.mark.parametrize("codec", ["int4", "int4-kivi"])
def test_int4_keys_are_grouped_per_channel(codec: str) -> None:
    """A huge key channel must not cost the other channels precision (KIVI's key axis)."""
    kv = torch.rand(1, 2, 1, 32, 64) * 0.01  # [L, 2, H, T, D]
    kv[:, 0, :, :, 5] += 100.0
    error = (roundtrip(codec, kv) - kv).abs()
    # float16 zero points keep the channel's offset exactly; an e4m3 one is rounded down by
    # up to one e4m3 step (1/8 of 100), which widens that channel's step to about 12.5 / 15.
    assert error[:, 0, :, :, 5].max() < (0.01 if codec == "int4-kivi" else 12.5 / 30)
    others = torch.cat([error[:, 0, :, :, :5], error[:, 0, :, :, 6:]], dim=-1)
    # e4m3 parameters: steps up to 1/8 wider, and the zero point rounded down by up to 2^-9
    # of the head's unit (100 / 448).
    slack = 1.01 if codec == "int4-kivi" else 1.125 * (1 + 100 / 448 * 2**-9 / 0.01) * 1.01
    assert others.max() < 0.01 / 30 * slack


@pytest.mark.parametrize("codec", ["int4", "int4-kivi"])
def test_int4_values_are_grouped_per_token(codec: str) -> None:
    """A huge value token must not cost the other tokens precision (KIVI's value axis)."""
    kv = torch.rand(1, 2, 1, 32, 64) * 0.01
    kv[:, 1, :, 7, :] += 100.0
    error = (roundtrip(codec, kv) - kv).abs()
    others = torch.cat([error[:, 1, :, :7], error[:, 1, :, 8:]], dim=2)
    slack = 1.01 if codec == "int4-kivi" else 1.125 * (1 + 100 / 448 * 2**-9 / 0.01) * 1.01
    assert others.max() < 0.01 / 30 * slack


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_scaled_codecs_scale_per_token_per_head(codec: str) -> None:
    kv = torch.rand(1, 2, 2, 8, 16) * 0.01
    kv[0, 0, 1, 3, :] *= 1000  # one (head, token) row is large
    error = (roundtrip(codec, kv) - kv).abs()
    error[0, 0, 1, 3, :] = 0
    assert error.max() < 0.01 * 0.07


@pytest.mark.parametrize("codec", CODEC_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e38])
def test_unencodable_values_are_refused(codec: str, bad: float) -> None:
    kv = fixed_block((1, 2, 1, 16, 8))
    kv[0, 1, 0, 5, 2] = bad
    if codec in ("bf16", "fp32") and bad == 1e38:  # within bfloat16's and float32's range
        assert (
            get_codec(codec).decode(get_codec(codec).encode(kv), torch.float32)[0, 1, 0, 5, 2]
            > 1e37
        )
        return
    with pytest.raises(InvalidArgument, match="NaN, inf or values beyond"):
        get_codec(codec).encode(kv)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_zero_blocks_are_exact(codec: str) -> None:
    """A zero row gets scale 0 (not a division by zero): it decodes to exact zeros."""
    kv = torch.zeros(1, 2, 1, 16, 8)
    kv[0, 0, 0, 3] = 0.5  # one non-zero row next to the zero ones
    out = roundtrip(codec, kv)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], kv[0, 1])


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int4", "int4-g64"])
def test_constant_groups_are_exact(codec: str) -> None:
    """int4 stores a constant group as zero point + scale 0 (int8/fp8 round their scale)."""
    kv = torch.full((1, 2, 1, 16, 8), 0.75)
    assert torch.equal(roundtrip(codec, kv), kv)
