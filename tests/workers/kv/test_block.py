"""The block value: golden bytes, round trips within bounds, and refusal of every bad value."""

import hashlib
import struct

import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool.errors import DataLoss, InvalidArgument
from tests.workers.kv.blocks import fixed_block, seeded_block
from workers.kv.block import (
    MAGIC,
    PREAMBLE_BYTES,
    BlockFormatError,
    decode_block,
    encode_block,
    read_header,
)
from workers.kv.codec import CODEC_NAMES, get_codec
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import BlockHash

HASH = BlockHash(bytes(range(32)))
OTHER_HASH = BlockHash(bytes(range(1, 33)))
GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32")
TOKENS = 64

# sha256 and length of encode_block(fixed_block((2, 2, 2, 64, 32)), codec, HASH). A change here
# breaks every stored value: bump FORMAT_VERSION and docs/block-format.md instead.
GOLDEN = {
    "fp16": ("e10c5f9037dd78c5c305af80ef25f3ba1385967681dd719d3ba93e9244db82ef", 32927),
    "bf16": ("9c5c4b7454e73dc1f26526e88c9a3e2ed565d852a3fce61983d9e069e6af9da1", 32928),
    "int8": ("9282effd98fa80b5232c922c9e03ee1370f8ae4e1ec29383f554716080415f47", 17581),
    "fp8": ("f87fbb06248294c7c575ad0d5cabcbd7e693f157d84843541c390b104ab79918", 17589),
    # int4 revision 2: float8 scales and zero points (the float16 layout is now int4-kivi).
    "int4": ("b792c5b72ecf91e5ee51e7d42f983f5ee6dc36e701fbb5e408891f9eb1a5ab5a", 9548),
    "int4-kivi": ("bf0c7a1dca9e265d01ac1650c9d281fa157840cfb9d25460eadffca282014067", 10501),
    "int4-g64": ("ef83fb1aadd9a0f73bee7364912be12e64e98a96d7d04bf2d0ef48016e1490c7", 9988),
    "fp32": ("42677ed8846bab850b2ed565bbc1ce3cb2006315d37a3b6eb82f08aca989c004", 65695),
}

TINY_SHAPE = (1, 2, 1, 4, 4)
TINY_GEOMETRY = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=4)


def tiny_value(codec: str) -> bytes:
    return encode_block(fixed_block(TINY_SHAPE), codec, HASH)


def decode_tiny(data: bytes) -> torch.Tensor:
    return decode_block(data, expected_hash=HASH, geometry=TINY_GEOMETRY, block_tokens=4)


def forge(value: bytes, version: int = 1, payload: bytes | None = None, **changes: object) -> bytes:
    """Rewrite a valid value's header fields and recompute both checksums, as a buggy or hostile
    writer could: only the reader's own checks stand between such a value and the model."""
    header_len, _ = struct.unpack_from("<HQ", value, 6)
    header = msgpack.unpackb(value[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len])
    payload = value[PREAMBLE_BYTES + header_len :] if payload is None else payload
    header["payload_xxh3"] = xxhash.xxh3_64_intdigest(payload)
    header.update(changes)
    raw = msgpack.packb(header)
    head = struct.pack("<4sHHQ", MAGIC, version, len(raw), len(payload))
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head + raw)) + raw + payload


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_golden_encoding(codec: str) -> None:
    data = encode_block(fixed_block((2, 2, 2, 64, 32)), codec, HASH)
    assert (hashlib.sha256(data).hexdigest(), len(data)) == GOLDEN[codec]


def test_value_starts_with_the_documented_preamble() -> None:
    data = tiny_value("int8")
    magic, version, header_len, payload_len, header_sum = struct.unpack_from("<4sHHQQ", data)
    assert (magic, version) == (b"KVPB", 1)
    assert len(data) == PREAMBLE_BYTES + header_len + payload_len
    assert header_sum == xxhash.xxh3_64_intdigest(data[:16] + data[24 : 24 + header_len])
    header = read_header(data)
    assert (header.codec, header.dtype, header.shape) == ("int8", "float32", TINY_SHAPE)
    assert header.block_hash == HASH


def error_bound(codec: str, kv: torch.Tensor) -> torch.Tensor:
    """The documented worst-case |decoded - kv| per element (docs/block-format.md, "Bounds").

    kv: [L, 2, H, T, D] float32. A float16 scale is only good to 2**-25 absolute (subnormals),
    which the quantized codecs' error scales by their largest code.
    """
    a = kv.abs()
    tiny = 2.0**-18
    if codec == "fp32":
        return torch.zeros_like(a)  # exact
    if codec == "fp16":
        return a * 2**-11 + 2**-24
    if codec == "bf16":
        return a * 2**-8 + tiny
    row = a.amax(dim=-1, keepdim=True)  # [L, 2, H, T, 1]
    if codec == "int8":
        return row * (0.5 / 127 * (1 + 2**-10) + 2**-11) + 127 * 2**-25 + tiny
    if codec == "fp8":
        return a * 2**-4 + row * (2**-10 / 448 + 2**-11) + 448 * 2**-25 + tiny
    # int4: per group, half a step of (hi - lo) / 15 plus float16 rounding of scale and zero.
    layers, _, heads, tokens, head_dim = kv.shape
    p = get_codec(codec).params((layers, 2, heads, tokens, head_dim))
    keys = kv[:, 0].unflatten(2, (tokens // p["k_group"], p["k_group"]))  # [L, H, n, gk, D]
    values = kv[:, 1].unflatten(3, (head_dim // p["v_group"], p["v_group"]))  # [L, H, T, n, gv]
    bounds = []
    for x, dim in ((keys, 3), (values, 4)):
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        if codec == "int4":
            b = _fp8_int4_bound(lo, hi) + tiny
        else:
            b = (hi - lo) * (0.5 / 15 + 2**-10) + torch.maximum(lo.abs(), hi.abs()) * 2**-10
            b = b + tiny
        bounds.append(b.expand_as(x).flatten(-3, -2) if dim == 3 else b.expand_as(x).flatten(-2))
    return torch.stack(bounds, dim=1)  # [L, 2, H, T, D]


def _fp8_int4_bound(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int4's error bound per group: half a step, the step being the group's range plus how
    far its e4m3 zero point was rounded down (one e4m3 step: 1/8 of |lo|, or 2^-9 of the head's
    zero unit), over 15, widened by the scale's rounding up (1/8, or 2^-9 of the scale unit).
    lo, hi: [L, H, ...] per group, keepdim."""
    per_head = tuple(range(2, lo.dim()))
    # The units are powers of two at or above head max / 448 (at most twice it, and >= 2^-24).
    zero_unit = lo.abs().amax(dim=per_head, keepdim=True) / 448 * 2 + 2**-24
    below = lo.abs() / 8 + zero_unit * 2**-9
    needed = (hi - lo + below) / 15
    scale_unit = needed.amax(dim=per_head, keepdim=True) / 448 * 2 + 2**-24
    step = needed * (1 + 1 / 8) + scale_unit * 2**-9
    return step * 0.5 * (1 + 2**-10) + torch.maximum(lo.abs(), hi.abs()) * 2**-20


OUTPUT_ROUNDING = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@st.composite
def blocks(draw: st.DrawFn) -> tuple[torch.Tensor, str]:
    shape = (
        draw(st.integers(1, 3)),
        2,
        draw(st.integers(1, 3)),
        draw(st.sampled_from([1, 2, 3, 7, 16, 24, 48, 64])),
        draw(st.sampled_from([1, 2, 5, 8, 20, 32, 64])),
    )
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    magnitude = 2.0 ** draw(st.integers(-20, 13))
    kind = draw(st.sampled_from(["normal", "zeros", "constant", "outliers"]))
    kv = seeded_block(shape, draw(st.integers(0, 2**32 - 1)), magnitude, kind)
    return kv.to(getattr(torch, dtype)), dtype


@pytest.mark.parametrize("codec", CODEC_NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=blocks())
def test_roundtrip_within_bound(codec: str, block: tuple[torch.Tensor, str]) -> None:
    kv, dtype = block
    layers, _, heads, tokens, head_dim = kv.shape
    geometry = KVGeometry(layers, heads, head_dim, dtype)
    data = encode_block(kv, codec, HASH)
    out = decode_block(data, expected_hash=HASH, geometry=geometry, block_tokens=tokens)
    assert out.dtype == kv.dtype and out.shape == kv.shape
    exact = kv.float()
    bound = error_bound(codec, exact)
    bound = bound + (exact.abs() + bound) * OUTPUT_ROUNDING[dtype]
    assert bool(((out.float() - exact).abs() <= bound).all())


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_raw_codecs_are_exact_in_their_own_dtype(codec: str) -> None:
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[codec]
    kv = fixed_block((2, 2, 2, 64, 32), getattr(torch, dtype))
    geometry = KVGeometry(2, 2, 32, dtype)
    out = decode_block(
        encode_block(kv, codec, HASH), expected_hash=HASH, geometry=geometry, block_tokens=64
    )
    assert torch.equal(out, kv)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_single_bit_flip_is_detected(codec: str) -> None:
    """Exhaustive over a tiny value: magic, lengths, checksums, header and payload."""
    data = tiny_value(codec)
    decode_tiny(data)
    flipped = bytearray(data)
    for bit in range(len(data) * 8):
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BlockFormatError):
            decode_tiny(bytes(flipped))
        flipped[bit // 8] ^= 1 << (bit % 8)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_truncation_and_extension_is_detected(codec: str) -> None:
    data = tiny_value(codec)
    for length in range(len(data)):
        with pytest.raises(BlockFormatError):
            decode_tiny(data[:length])
    with pytest.raises(BlockFormatError):
        decode_tiny(data + b"\0")


@settings(max_examples=200, deadline=None)
@given(codec=st.sampled_from(CODEC_NAMES), data=st.data())
def test_bit_flips_in_a_real_sized_value(codec: str, data: st.DataObject) -> None:
    value = bytearray(encode_block(fixed_block((2, 2, 2, 64, 32)), codec, HASH))
    bit = data.draw(st.integers(0, len(value) * 8 - 1))
    value[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BlockFormatError):
        decode_block(bytes(value), expected_hash=HASH, geometry=GEOMETRY, block_tokens=TOKENS)


@settings(max_examples=300, deadline=None)
@given(
    junk=st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=600).map(lambda b: MAGIC + b"\x01\x00" + b),
    )
)
def test_random_bytes_are_refused(junk: bytes) -> None:
    with pytest.raises(BlockFormatError):
        decode_tiny(junk)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["hash", "codec", "dtype", "shape", "params", "layout", "payload_xxh3"]),
    replacement=msgpack_values,
)
def test_forged_header_fields_are_refused(field: str, replacement: object) -> None:
    """A header with valid checksums but any other value in one field never decodes."""
    value = tiny_value("int4")
    forged = forge(value, **{field: replacement})
    if forged == forge(value):
        return  # hypothesis drew the field's true value
    with pytest.raises(BlockFormatError):
        decode_tiny(forged)


@settings(max_examples=200, deadline=None)
@given(header=msgpack_values)
def test_arbitrary_msgpack_headers_are_refused(header: object) -> None:
    raw = msgpack.packb(header)
    head = struct.pack("<4sHHQ", MAGIC, 1, len(raw), 0)
    with pytest.raises(BlockFormatError):
        decode_tiny(head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head + raw)) + raw)


def test_forge_is_faithful() -> None:
    """Guards the tests above: an unchanged forgery decodes like the original."""
    value = tiny_value("int8")
    assert forge(value) == value
    assert torch.equal(decode_tiny(forge(value)), decode_tiny(value))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"version": 2}, "version"),
        ({"codec": "int2"}, "codec"),
        ({"codec": "fp16"}, "header"),  # a known codec whose layout does not match
        ({"hash": bytes(OTHER_HASH)}, "hash"),
        ({"dtype": "float16"}, "geometry"),
        ({"shape": [1, 2, 1, 4, 8]}, "geometry"),
        ({"shape": [1, 2, 1, 4, True]}, "header"),
        ({"params": {"k_group": 2, "v_group": 4}}, "header"),
        ({"layout": [["q", "uint8", [16]]]}, "header"),
        ({"extra": 1}, "header"),
        ({"payload": b"\0" * 8}, "payload"),
    ],
)
def test_forged_values_are_refused_with_a_reason(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(BlockFormatError) as info:
        decode_tiny(forge(tiny_value("int4"), **changes))  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert isinstance(info.value, DataLoss)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp8"])
def test_nan_payload_with_valid_checksums_is_refused(codec: str) -> None:
    value = tiny_value(codec)
    header_len = struct.unpack_from("<H", value, 6)[0]
    payload = bytearray(value[PREAMBLE_BYTES + header_len :])
    payload[0:2] = b"\xff\xff"  # NaN as float16, bfloat16 and float8 e4m3 alike
    with pytest.raises(BlockFormatError) as info:
        decode_tiny(forge(value, payload=bytes(payload)))
    assert info.value.reason == "values"


def test_nonzero_padding_is_refused() -> None:
    # 3 tokens: 24 bytes of int8 codes, then 12 bytes of float16 scales padded to 16.
    value = encode_block(fixed_block((1, 2, 1, 3, 4)), "int8", HASH)
    header_len = struct.unpack_from("<H", value, 6)[0]
    payload = bytearray(value[PREAMBLE_BYTES + header_len :])
    assert len(payload) == 40 and payload[-4:] == bytes(4)
    payload[-1] = 1
    with pytest.raises(BlockFormatError) as info:
        decode_block(
            forge(value, payload=bytes(payload)),
            expected_hash=HASH,
            geometry=TINY_GEOMETRY,
            block_tokens=3,
        )
    assert info.value.reason == "payload"


def test_wrong_expected_hash_is_refused() -> None:
    data = tiny_value("int8")
    with pytest.raises(BlockFormatError) as info:
        decode_block(data, expected_hash=OTHER_HASH, geometry=TINY_GEOMETRY, block_tokens=4)
    assert info.value.reason == "hash"


@pytest.mark.parametrize(
    ("geometry", "block_tokens"),
    [
        (KVGeometry(2, 1, 4), 4),  # layers
        (KVGeometry(1, 2, 4), 4),  # kv heads
        (KVGeometry(1, 1, 8), 4),  # head dim
        (KVGeometry(1, 1, 4, "bfloat16"), 4),  # dtype
        (TINY_GEOMETRY, 8),  # block size
    ],
)
def test_another_geometry_is_refused(geometry: KVGeometry, block_tokens: int) -> None:
    with pytest.raises(BlockFormatError) as info:
        decode_block(
            tiny_value("int8"), expected_hash=HASH, geometry=geometry, block_tokens=block_tokens
        )
    assert info.value.reason == "geometry"


def test_decode_output_is_a_fresh_tensor_in_the_model_dtype() -> None:
    kv = fixed_block(TINY_SHAPE, torch.bfloat16)
    geometry = KVGeometry(1, 1, 4, "bfloat16")
    data = bytearray(encode_block(kv, "bf16", HASH))
    out = decode_block(data, expected_hash=HASH, geometry=geometry, block_tokens=4, device="cpu")
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu"
    data[-8:] = bytes(8)  # the caller reusing its buffer must not change the tensor
    out += 1  # and the tensor must be writable without touching the caller's bytes
    assert torch.equal(out, kv + 1)


def test_encode_rejects_caller_mistakes() -> None:
    kv = fixed_block(TINY_SHAPE)
    with pytest.raises(InvalidArgument):
        encode_block(kv[:, :1], "int8", HASH)
    with pytest.raises(InvalidArgument):
        encode_block(kv.to(torch.int32), "int8", HASH)
    with pytest.raises(InvalidArgument):
        encode_block(kv, "int3", HASH)
    with pytest.raises(InvalidArgument):
        encode_block(kv, "int8", BlockHash(b"\0" * 31))
    with pytest.raises(InvalidArgument):
        decode_block(b"", expected_hash=HASH, geometry=TINY_GEOMETRY, block_tokens=0)


def test_read_header_without_payload_check() -> None:
    value = bytearray(tiny_value("int8"))
    value[-1] ^= 1
    assert read_header(bytes(value), verify_payload=False).codec == "int8"
    with pytest.raises(BlockFormatError):
        read_header(bytes(value))
