"""Codecs: one block of K and V <-> a few typed tensors ("sections") that become the payload.

A codec never sees bytes. It declares the sections a block of a given shape turns into
(`layout`), fills them (`encode`) and rebuilds the block from them (`decode`); `workers.kv.block`
lays the sections out as bytes, checksums them and parses them back. Keeping the codecs at the
tensor level lets them run on the GPU and keeps every byte-level rule in one module.

Every codec computes in float32 whatever the model dtype, stores its scales as float16, and uses
the float16-rounded scale to quantize, so decode multiplies by exactly the scale encode divided
by. Layouts, byte by byte, are in docs/block-format.md; accuracy is measured by
`kvpool bench codec` (docs/benchmarks.md).
"""

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvpool.errors import InvalidArgument
from workers.kv.hashing import CODEC_NAMES

__all__ = ["CODEC_NAMES", "BlockShape", "Codec", "Section", "dtype_name", "get_codec"]

BlockShape = tuple[int, int, int, int, int]  # [layers, 2 (K, V), kv_heads, block_tokens, head_dim]

FP16_MAX = 65504.0
INT8_MAX = 127.0
INT4_LEVELS = 15.0  # codes 0..15
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# Section dtypes by the name the block header uses (torch's name without "torch.").
SECTION_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float16` -> "float16", the spelling used in headers and in KVGeometry."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class Section:
    """One typed, row-major tensor of the payload."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if dtype_name(self.dtype) not in SECTION_DTYPES:
            raise ValueError(f"section dtype must be one of {sorted(SECTION_DTYPES)}")
        if not self.shape or any(type(n) is not int or n <= 0 for n in self.shape):
            raise ValueError(f"section shape must be positive ints, got {self.shape!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Codec(Protocol):
    """Turns a block [layers, 2, kv_heads, block_tokens, head_dim] into sections and back."""

    @property
    def name(self) -> str:
        """The codec spec, as hashed into the namespace and written in the header."""
        ...

    def params(self, shape: BlockShape) -> dict[str, int]:
        """Parameters a reader needs besides the layout (recorded in the header)."""
        ...

    def layout(self, shape: BlockShape) -> tuple[Section, ...]:
        """The sections, in payload order, that a block of `shape` encodes to."""
        ...

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        """kv: [L, 2, H, T, D] floating, finite. Returns tensors matching `layout`, on kv's device.

        Raises InvalidArgument when kv holds NaN/inf or values the codec cannot represent.
        """
        ...

    def decode(self, sections: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Sections as `layout` describes them -> [L, 2, H, T, D] in `dtype`, on their device."""
        ...

    def decode_into(self, sections: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Like `decode`, into `out` ([L, 2, H, T, D], any strides, on the sections' device)."""
        ...


def _reject_nonfinite(finite: torch.Tensor, what: str) -> None:
    if not bool(finite.all()):
        raise InvalidArgument(f"cannot encode a KV block: {what}")


@dataclass(frozen=True, slots=True)
class RawCodec:
    """The block cast to a float dtype: exact when the model runs in that dtype (fp32: exact for
    a float32 model, which an engine with no codec of its own, such as vLLM on a CPU, is)."""

    name: str
    storage: torch.dtype

    def params(self, shape: BlockShape) -> dict[str, int]:
        return {}

    def layout(self, shape: BlockShape) -> tuple[Section, ...]:
        return (Section("data", self.storage, shape),)

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        # NaN fails both comparisons; float32 values beyond float16's range would become inf.
        # (Two reductions are several times faster than torch.isfinite(...).all() on CPU.)
        limit = torch.finfo(self.storage).max
        _reject_nonfinite(
            (kv.amin() >= -limit) & (kv.amax() <= limit), f"NaN, inf or values beyond {self.name}"
        )
        return [kv.to(self.storage).contiguous()]  # [L, 2, H, T, D]

    def decode(self, sections: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return sections[0].to(dtype)  # [L, 2, H, T, D]

    def decode_into(self, sections: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(sections[0])


@dataclass(frozen=True, slots=True)
class ScaledCodec:
    """Symmetric, one float16 scale per (layer, K/V, head, token): int8 or float8 e4m3 codes."""

    name: str
    storage: torch.dtype
    code_max: float  # largest code magnitude: 127 for int8, 448 for e4m3

    def params(self, shape: BlockShape) -> dict[str, int]:
        return {}

    def layout(self, shape: BlockShape) -> tuple[Section, ...]:
        return (Section("q", self.storage, shape), Section("scale", torch.float16, shape[:4]))

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        x = kv.float()  # [L, 2, H, T, D]
        amax = x.abs().amax(dim=-1)  # [L, 2, H, T]
        # NaN fails the comparison, so this one check also refuses NaN and inf.
        _reject_nonfinite(amax <= FP16_MAX * self.code_max, "NaN, inf or values beyond float16")
        scale = (amax / self.code_max).to(torch.float16)  # [L, 2, H, T]
        # An all-zero (or float16-underflowing) row gets scale 0: its codes are all 0.
        inverse = torch.where(scale > 0, 1.0 / scale.float(), 0.0).unsqueeze(-1)  # [L, 2, H, T, 1]
        scaled = torch.mul(x, inverse).clamp_(-self.code_max, self.code_max)  # [L, 2, H, T, D]
        if self.storage == torch.int8:
            scaled.round_()
        return [scaled.to(self.storage), scale]

    def decode(self, sections: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q, scale = sections
        if q.dtype == torch.float8_e4m3fn:
            # torch's float8 -> float32 cast runs at ~1 GB/s on CPU; a 256-entry table is faster.
            table = _E4M3_TABLE.to(q.device)
            values = table.index_select(0, q.reshape(-1).view(torch.uint8).int())  # [L*2*H*T*D]
            values = values.view(q.shape).mul_(scale.float().unsqueeze(-1))  # [L, 2, H, T, D]
        else:
            values = torch.mul(q, scale.float().unsqueeze(-1))  # [L, 2, H, T, D] float32
        return values.to(dtype)

    def decode_into(self, sections: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        q, scale = sections
        if q.dtype == torch.float8_e4m3fn:
            out.copy_(self.decode(sections, out.dtype))
        else:
            # Computed in float32 and rounded once into out's dtype, exactly as `decode` does.
            torch.mul(q, scale.float().unsqueeze(-1), out=out)


# Every float8 e4m3 bit pattern as float32 ([256]; 0x7F and 0xFF are NaN, refused on decode).
_E4M3_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _group_size(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit, so groups tile a block with no padding."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _fp8_step(values: torch.Tensor, up: bool) -> torch.Tensor:
    """values (float8 e4m3) moved one representable step up (toward +inf) or down."""
    bits = values.view(torch.uint8).int()  # sign bit 0x80, then magnitude
    negative = bits >= 0x80
    magnitude_up = negative != up  # up on a positive value grows it; on a negative, shrinks it
    stepped = torch.where(magnitude_up, bits + 1, bits - 1)
    # Zero's neighbours are the smallest subnormals: +2^-9 (0x01) above, -2^-9 (0x81) below.
    stepped = torch.where(bits == 0, 0x01 if up else 0x81, stepped)
    stepped = torch.where(bits == 0x80, 0x01 if up else 0x81, stepped)  # -0
    return stepped.to(torch.uint8).view(torch.float8_e4m3fn)


def _fp8_rounded(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x (float32) rounded to a float8 e4m3 at or above it (`up`), or at or below it."""
    nearest = x.to(torch.float8_e4m3fn)
    wrong_side = nearest.float() < x if up else nearest.float() > x
    return torch.where(wrong_side, _fp8_step(nearest, up), nearest)


def _int4_fp8_params(
    x: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As _int4_params, with each group's scale and zero point as one float8 e4m3 each.

    The bytes are relative to two float16 units per (layer, head) of the block, powers of two:
    the largest zero-point magnitude and the largest scale of the head map into (224, 448] of
    e4m3, so the bytes keep 3 mantissa bits over float16's whole range. The zero point is
    rounded down and the scale up, so [zero, zero + 15 * scale] still covers the group: no
    value is clipped, and the step is at most about 1/8 wider than with float16 parameters.

    x: [L, H, a, b, c] with groups along `dim`. Returns the e4m3 scale and zero codes (x's shape
    without `dim`), the float16 units [L, H, 2] (scale unit, zero unit), and the float32 zero
    and reciprocal scale to quantize with (`dim` kept, size 1): exactly what decode will use.
    """
    lo = x.amin(dim=dim)  # [L, H, ...groups]
    hi = x.amax(dim=dim)
    # maximum() propagates NaN, which fails the comparison: one check refuses NaN and inf too.
    _reject_nonfinite(torch.maximum(hi, -lo) <= FP16_MAX / 2, "NaN, inf or values beyond float16")
    per_head = tuple(range(2, lo.dim()))  # the group axes of [L, H, ...]
    zero_unit = _fp16_at_least(lo.abs().amax(dim=per_head) / FP8_MAX)  # [L, H]
    zero_code = _fp8_rounded(_in_units(lo, zero_unit), up=False)
    zero = _times_unit(zero_code, zero_unit)
    needed = ((hi - zero) / INT4_LEVELS).clamp(min=0)
    scale_unit = _fp16_at_least(needed.amax(dim=per_head) / FP8_MAX)  # [L, H]
    scale_code = _fp8_rounded(_in_units(needed, scale_unit), up=True)
    scale = _times_unit(scale_code, scale_unit)
    inverse = torch.where(scale > 0, 1.0 / scale, 0.0)
    units = torch.stack([scale_unit, zero_unit], dim=-1)  # [L, H, 2]
    return scale_code, zero_code, units, zero.unsqueeze(dim), inverse.unsqueeze(dim)


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x (float32, >= 0, at most FP16_MAX / 448) as the smallest power of two at or above it,
    in float16 (0 where x is 0). A power of two only moves the e4m3 codes' exponent, so they
    keep their precision, and code * unit is exact in float32: a constant group whose value has
    a 3-bit mantissa comes back exactly."""
    exponent = torch.ceil(torch.log2(x.clamp(min=2**-24))).clamp(-24, 15)
    unit = torch.exp2(exponent)
    unit = torch.where(unit < x, unit * 2, unit)  # log2's rounding must not land below x
    return torch.where(x > 0, unit, 0.0).to(torch.float16)


def _unit_view(unit: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [L, H] unit as float32 [L, H, 1, ...], broadcasting against `like`."""
    return unit.float().reshape(*unit.shape, *([1] * (like.dim() - 2)))


def _in_units(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = _unit_view(unit, x)
    return torch.where(u > 0, x / u, 0.0).clamp(-FP8_MAX, FP8_MAX)


def _times_unit(codes: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """e4m3 codes [L, H, ...] times their head's float16 unit, in float32 (encode and decode)."""
    return codes.float() * _unit_view(unit, codes)


def _int4_params(
    x: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit parameters for groups laid along `dim` of x (x: [..., G, ...]).

    Returns the float16 scale and zero point (x's shape without `dim`), and the float32 zero
    and reciprocal scale to quantize with (`dim` kept, size 1): encode quantizes with exactly
    the float16 values decode will use.
    """
    lo = x.amin(dim=dim)
    hi = x.amax(dim=dim)
    # maximum() propagates NaN, which fails the comparison: one check refuses NaN and inf too.
    _reject_nonfinite(torch.maximum(hi, -lo) <= FP16_MAX, "NaN, inf or values beyond float16")
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / INT4_LEVELS).clamp(max=FP16_MAX).to(torch.float16)
    # A constant (or float16-underflowing) group gets scale 0: all its codes are 0.
    inverse = torch.where(scale > 0, 1.0 / scale.float(), 0.0)
    return scale, zero, zero.float().unsqueeze(dim), inverse.unsqueeze(dim)


# Packing views pairs of uint8 codes as one int16, which assumes little-endian memory.
if sys.byteorder != "little":
    raise ImportError("workers.kv.codec packs int4 codes assuming a little-endian machine")


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes: [n] uint8 in 0..15 -> [ceil(n / 2)] uint8; code 2i low nibble, 2i+1 high."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])  # [n + 1]
    pairs = codes.view(torch.int16)  # [n / 2] = code 2i + 256 * code 2i+1 (contiguous reads)
    # The low byte of pairs | pairs >> 4 is code 2i | code 2i+1 << 4; the cast keeps that byte.
    return (pairs | (pairs >> 4)).to(torch.uint8)  # [n / 2]


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """packed: [m] uint8 -> [count] uint8 codes, the inverse of _pack_nibbles."""
    wide = packed.to(torch.int16)  # [m]: byte b -> b | b << 4 masked to low nibble, high nibble
    wide = wide.bitwise_or_(wide << 4).bitwise_and_(0x0F0F)  # [m] = lo + 256 * hi
    return wide.view(torch.uint8)[:count]  # [2m] -> [count]


@dataclass(frozen=True, slots=True)
class KiviInt4Codec:
    """KIVI 4-bit: keys per channel (groups along tokens), values per token (groups along
    channels), asymmetric with a scale and zero point per group, two codes per byte.

    Keys carry a few outlier channels, so a key group shares one channel; values do not, so a
    value group shares one token (the KIVI paper's finding, confirmed by `kvpool bench codec`).
    `int4` keeps each group's scale and zero point in float8 (2 bytes a group of 32: 4.5 bits an
    element, 3.55x smaller than fp16); `int4-kivi` and `int4-g64` in float16.
    """

    name: str
    group: int  # target group size; the real one divides the block (see _group_size)
    params_dtype: torch.dtype = torch.float16  # of the scales and zero points

    def params(self, shape: BlockShape) -> dict[str, int]:
        _, _, _, tokens, head_dim = shape
        return {
            "k_group": _group_size(tokens, self.group),
            "v_group": _group_size(head_dim, self.group),
        }

    def layout(self, shape: BlockShape) -> tuple[Section, ...]:
        layers, _, heads, tokens, head_dim = shape
        p = self.params(shape)
        k_groups = (layers, heads, tokens // p["k_group"], head_dim)
        v_groups = (layers, heads, tokens, head_dim // p["v_group"])
        p_dtype = self.params_dtype
        sections = (
            Section("q", torch.uint8, ((math.prod(shape) + 1) // 2,)),
            Section("k_scale", p_dtype, k_groups),
            Section("k_zero", p_dtype, k_groups),
            Section("v_scale", p_dtype, v_groups),
            Section("v_zero", p_dtype, v_groups),
        )
        if p_dtype == torch.float16:
            return sections
        # The float16 units of the e4m3 parameters: [layer, K/V, head, (scale, zero)].
        return (*sections, Section("units", torch.float16, (layers, 2, heads, 2)))

    def _views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [L, 2, H, T, D] -> keys [L, H, T/gk, gk, D] and values [L, H, T, D/gv, gv] views."""
        layers, _, heads, tokens, head_dim = x.shape
        p = self.params((layers, 2, heads, tokens, head_dim))
        gk, gv = p["k_group"], p["v_group"]
        keys = x[:, 0].unflatten(2, (tokens // gk, gk))  # [L, H, T/gk, gk, D]
        values = x[:, 1].unflatten(3, (head_dim // gv, gv))  # [L, H, T, D/gv, gv]
        return keys, values

    def encode(self, kv: torch.Tensor) -> list[torch.Tensor]:
        x = kv.float()  # [L, 2, H, T, D]; kv itself when float32, so never written to
        keys, values = self._views(x)
        units = None
        if self.params_dtype == torch.float16:
            k_scale, k_zero, k_shift, k_inverse = _int4_params(keys, dim=3)  # [L, H, T/gk, D]
            v_scale, v_zero, v_shift, v_inverse = _int4_params(values, dim=4)  # [L, H, T, D/gv]
        else:
            k_scale, k_zero, k_units, k_shift, k_inverse = _int4_fp8_params(keys, dim=3)
            v_scale, v_zero, v_units, v_shift, v_inverse = _int4_fp8_params(values, dim=4)
            units = torch.stack([k_units, v_units], dim=1)  # [L, 2, H, 2]
        # One float buffer, worked on in place: fresh multi-MB temporaries cost page faults.
        y = torch.empty_like(x)  # [L, 2, H, T, D]
        y_keys, y_values = self._views(y)
        torch.sub(keys, k_shift, out=y_keys).mul_(k_inverse)
        torch.sub(values, v_shift, out=y_values).mul_(v_inverse)
        # float -> int8 is ~10x faster than float -> uint8 on CPU; codes 0..15 fit either way.
        codes = (
            y.round_().clamp_(0, INT4_LEVELS).to(torch.int8).view(torch.uint8)
        )  # [L, 2, H, T, D]
        out = [_pack_nibbles(codes.view(-1)), k_scale, k_zero, v_scale, v_zero]
        return out if units is None else [*out, units]

    def decode(self, sections: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        packed, k_scale, k_zero, v_scale, v_zero = sections[:5]
        layers, heads, _, head_dim = k_scale.shape
        tokens = v_scale.shape[2]
        shape = (layers, 2, heads, tokens, head_dim)
        if len(sections) == 6:  # e4m3 parameters in units of their head's float16
            units = sections[5]  # [L, 2, H, (scale, zero)]
            k_scale, k_zero = (
                _times_unit(c, units[:, 0, :, n]) for n, c in ((0, k_scale), (1, k_zero))
            )
            v_scale, v_zero = (
                _times_unit(c, units[:, 1, :, n]) for n, c in ((0, v_scale), (1, v_zero))
            )
        x = _unpack_nibbles(packed, math.prod(shape)).view(shape).float()  # [L, 2, H, T, D]
        keys, values = self._views(x)
        keys.mul_(k_scale.float().unsqueeze(3)).add_(k_zero.float().unsqueeze(3))
        values.mul_(v_scale.float().unsqueeze(4)).add_(v_zero.float().unsqueeze(4))
        return x.to(dtype)

    def decode_into(self, sections: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        out.copy_(self.decode(sections, out.dtype))


_CODECS: dict[str, Codec] = {
    "fp16": RawCodec("fp16", torch.float16),
    "bf16": RawCodec("bf16", torch.bfloat16),
    "int8": ScaledCodec("int8", torch.int8, INT8_MAX),
    "fp8": ScaledCodec("fp8", torch.float8_e4m3fn, FP8_MAX),
    "int4": KiviInt4Codec("int4", group=32, params_dtype=torch.float8_e4m3fn),
    "int4-kivi": KiviInt4Codec("int4-kivi", group=32),
    "int4-g64": KiviInt4Codec("int4-g64", group=64),
    "fp32": RawCodec("fp32", torch.float32),
}
if tuple(_CODECS) != CODEC_NAMES:  # a new spec must be both hashed and implemented
    raise ImportError(f"codec registry {tuple(_CODECS)} != hashing.CODEC_NAMES {CODEC_NAMES}")


def get_codec(spec: str) -> Codec:
    """The codec for a spec such as "int8"; raises InvalidArgument naming the allowed specs."""
    codec = _CODECS.get(spec) if isinstance(spec, str) else None
    if codec is None:
        raise InvalidArgument(f"unknown codec {spec!r}; allowed: {', '.join(CODEC_NAMES)}")
    return codec
