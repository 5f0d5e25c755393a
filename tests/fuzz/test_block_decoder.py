"""Fuzzing the block decoder, the one parser of bytes that come back from the shared store.

tests/workers/kv/test_block.py pins the format and refuses single bit flips, truncations and
one forged header field at a time. This file throws structured damage at it, bounded in time:

- stacks of random edits (flips, overwrites, inserts, deletes, splices from other valid values,
  swaps, truncations): the decoder raises BlockFormatError or returns exactly the original tensor;
- forged values with valid checksums (several header fields, extra keys, lying lengths), as a
  buggy or hostile writer could make: BlockFormatError, or exactly the original tensor;
- forged payloads with valid checksums: checksums are not signatures, so such a value may decode,
  but only to a finite tensor of the expected shape and dtype; never a crash, never NaN or inf;
- stored session records (the other value a worker or gateway reads back): only DataLoss.

Any other exception type fails the test.
"""

import struct

import msgpack
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool.errors import DataLoss
from services.gateway.sessions import Session, decode_session, encode_session
from tests.workers.kv.blocks import seeded_block
from workers.kv.block import MAGIC, PREAMBLE_BYTES, BlockFormatError, decode_block, encode_block
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import CODEC_NAMES, BlockHash

HASH = BlockHash(bytes(range(32)))
OTHER_HASH = BlockHash(bytes(range(100, 132)))
# Small enough for hundreds of examples per second, large enough for every codec's groups.
GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32")
TOKENS = 32
SHAPE = GEOMETRY.block_shape(TOKENS)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _value(codec: str, seed: int, block_hash: BlockHash = HASH) -> bytes:
    kv = seeded_block(SHAPE, seed, 3.0, "outliers")  # [L, 2, H, T, D] float32
    return encode_block(kv, codec, block_hash)


VALUES = {codec: _value(codec, seed=7) for codec in CODEC_NAMES}
# Other valid values to splice from: another codec, another seed, another hash.
DONORS = [_value("int8", 11), _value("fp16", 12, OTHER_HASH), _value("int4", 13)]


def decode(data: bytes) -> torch.Tensor:
    return decode_block(data, expected_hash=HASH, geometry=GEOMETRY, block_tokens=TOKENS)


ORIGINALS = {codec: decode(value) for codec, value in VALUES.items()}


def decode_or_refuse(data: bytes) -> torch.Tensor | None:
    """The decoded tensor, or None when refused; anything but BlockFormatError propagates."""
    try:
        return decode(data)
    except BlockFormatError:
        return None


@st.composite
def edits(draw: st.DrawFn, value: bytes) -> bytes:
    """`value` after one to four random edits."""
    data = bytearray(value)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        kind = draw(
            st.sampled_from(
                ["flip", "set", "insert", "delete", "splice", "swap", "truncate", "append"]
            )
        )
        at = draw(st.integers(0, max(n - 1, 0)))
        if kind == "flip" and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and n:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            donor = draw(st.sampled_from(DONORS))
            start = draw(st.integers(0, len(donor) - 1))
            piece = donor[start : start + draw(st.integers(1, 256))]
            data[at : at + len(piece)] = piece
        elif kind == "swap" and n > 2:
            size = draw(st.integers(1, max(1, n // 4)))
            a, b = sorted(draw(st.lists(st.integers(0, n - size), min_size=2, max_size=2)))
            if b - a >= size:
                data[a : a + size], data[b : b + size] = data[b : b + size], data[a : a + size]
        elif kind == "truncate":
            del data[at:]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@pytest.mark.parametrize("codec", CODEC_NAMES)
@FUZZ
@given(data=st.data())
def test_edited_values_are_refused_or_decode_to_the_original(codec: str, data) -> None:
    edited = data.draw(edits(VALUES[codec]))
    decoded = decode_or_refuse(edited)
    if decoded is not None:
        assert torch.equal(decoded, ORIGINALS[codec]), "a damaged value decoded to other tensors"
    elif edited == VALUES[codec]:
        pytest.fail("the unedited value was refused")


def _split(value: bytes) -> tuple[dict, bytes]:
    (header_len,) = struct.unpack_from("<H", value, 6)
    header = msgpack.unpackb(value[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len])
    return header, value[PREAMBLE_BYTES + header_len :]


def forge(
    header: object,
    payload: bytes,
    *,
    version: int = 1,
    payload_len: int | None = None,
    fix_payload_sum: bool = True,
) -> bytes:
    """A value whose checksums are valid for whatever header and payload it carries."""
    if fix_payload_sum and isinstance(header, dict):
        header = {**header, "payload_xxh3": xxhash.xxh3_64_intdigest(payload)}
    raw = msgpack.packb(header)
    length = len(payload) if payload_len is None else payload_len
    head = struct.pack("<4sHHQ", MAGIC, version, len(raw), length)
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head + raw)) + raw + payload


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Plausible wrong values: the ones a writer with another model, codec or geometry would send.
plausible = st.sampled_from(
    [
        "fp16", "int8", "int4", "int4-g64", "float16", "bfloat16", "float32", "uint8", 0, 1, 2,
        16, 31, 32, 33, 64, -1, 2**31, 2**63, [2, 2, 2, 32, 32], [1, 2, 2, 32, 32],
        [2, 2, 2, 16, 32], [2, 2, 2, 32, 16], [], {}, {"k_group": 32}, {"v_group": 32},
        [["data", "float16", [2, 2, 2, 32, 32]]], bytes(32), bytes(OTHER_HASH),
    ]
)  # fmt: skip
FIELDS = ["hash", "codec", "dtype", "shape", "params", "layout", "payload_xxh3"]


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from([*FIELDS, "extra", "version", "v"]),
        plausible | msgpack_values,
        min_size=1,
        max_size=4,
    ),
    drop=st.lists(st.sampled_from(FIELDS), max_size=2),
)
def test_forged_headers_are_refused_or_decode_to_the_original(
    codec: str, changes: dict, drop: list
) -> None:
    header, payload = _split(VALUES[codec])
    forged_header = {**header, **changes}
    for name in drop:
        forged_header.pop(name, None)
    decoded = decode_or_refuse(forge(forged_header, payload, fix_payload_sum=False))
    if decoded is not None:
        assert torch.equal(decoded, ORIGINALS[codec])


@FUZZ
@given(
    codec=st.sampled_from(CODEC_NAMES),
    version=st.integers(0, 2**16 - 1),
    payload_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    cut=st.integers(-64, 64),
)
def test_lying_preambles_are_refused(codec: str, version: int, payload_len, cut: int) -> None:
    """Wrong version, a payload length that does not match, a payload cut or padded."""
    header, payload = _split(VALUES[codec])
    body = payload[:cut] if cut < 0 else payload + bytes(cut)
    forged = forge(header, body, version=version, payload_len=payload_len)
    decoded = decode_or_refuse(forged)
    if decoded is not None:
        assert (version, cut) == (1, 0) and payload_len in (None, len(payload))
        assert torch.equal(decoded, ORIGINALS[codec])


@pytest.mark.parametrize("codec", CODEC_NAMES)
@FUZZ
@given(data=st.data())
def test_forged_payloads_with_valid_checksums_never_yield_nan_or_a_wrong_shape(
    codec: str, data
) -> None:
    """A writer that recomputes the checksums can change the numbers (only auth on the store
    keeps such writers out), but the model still never sees NaN, inf or a misshapen block."""
    header, payload = _split(VALUES[codec])
    body = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(body) - 1))
        piece = data.draw(
            st.sampled_from([b"\xff\xff", b"\x00\x7c", b"\x00\xfc", b"\x7f\x80", b"\xff\x7f"])
            | st.binary(min_size=1, max_size=8)
        )
        body[at : at + len(piece)] = piece[: len(body) - at]
    decoded = decode_or_refuse(forge(header, bytes(body)))
    if decoded is not None:
        assert decoded.shape == SHAPE and decoded.dtype == torch.float32
        assert bool(torch.isfinite(decoded).all())


@FUZZ
@given(junk=st.binary(max_size=200), header=msgpack_values)
def test_valid_framing_around_junk_is_refused(junk: bytes, header: object) -> None:
    with pytest.raises(BlockFormatError):
        decode(forge(header, junk))


# --- session records: the gateway reads these back from the same shared store ---------------

SESSION = Session("s-1", "acme", (1, 2, 3, 70000), turns=2, created_unix_s=1.0, updated_unix_s=2.0)
SECRET = b"fuzz-namespace-secret-0123456789"
SESSION_VALUE = encode_session(SESSION, SECRET)


@FUZZ
@given(data=st.data())
def test_damaged_session_records_raise_data_loss_only(data) -> None:
    value = data.draw(
        st.one_of(
            edits(SESSION_VALUE),
            st.binary(max_size=120),
            msgpack_values.map(msgpack.packb),
            st.dictionaries(
                st.sampled_from(["v", "owner", "tokens", "turns", "created", "updated"]),
                msgpack_values,
            ).map(lambda d: msgpack.packb({**msgpack.unpackb(SESSION_VALUE), **d})),
        )
    )
    try:
        session = decode_session(value, tenant="acme", session_id="s-1", secret=SECRET)
    except DataLoss:
        return
    # A record that parses belongs to this tenant and id and has sane fields.
    assert (session.tenant, session.session_id) == ("acme", "s-1")
    assert session.turns >= 0 and all(0 <= t < 2**32 for t in session.token_ids)
