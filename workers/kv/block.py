"""The block value: the bytes stored under `block_key(hash)`, and the only parser of them.

    preamble (24 bytes) | msgpack header (H bytes) | payload (P bytes)

The preamble fixes the magic, format version, H and P, and an xxh3-64 of itself and the
header; the header carries the payload's xxh3-64. So any flipped bit (magic, lengths, header,
payload or a checksum) and any truncation fail a check before a tensor is built. Values come
from a shared store and are untrusted: no pickle, no torch.load, msgpack with small limits and
exact type checks, and every length and shape compared with what the reader expects before any
allocation. docs/block-format.md describes the format byte by byte.
"""

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import torch
import xxhash

from kvpool.errors import DataLoss, InvalidArgument
from workers.kv.codec import SECTION_DTYPES, Codec, Section, dtype_name, get_codec
from workers.kv.geometry import DTYPE_BYTES, KVGeometry
from workers.kv.hashing import CODEC_NAMES, FORMAT_VERSION, HASH_BYTES, BlockHash, as_block_hash

MAGIC = b"KVPB"
_PREAMBLE = struct.Struct("<4sHHQQ")  # magic, version, header length, payload length, checksum
PREAMBLE_BYTES = _PREAMBLE.size  # 24
_CHECKED_PREAMBLE = 16  # the header checksum covers the preamble up to itself
MAX_HEADER_BYTES = 4096
ALIGN = 8  # every payload section starts at a multiple of this, so it can be viewed in place
_HEADER_KEYS = frozenset({"hash", "codec", "dtype", "shape", "params", "layout", "payload_xxh3"})


class BlockFormatError(DataLoss):
    """A stored value failed verification; readers treat it as a miss, delete it and count it.

    `reason` is one short word from a fixed set (truncated, magic, version, checksum, header,
    hash, codec, geometry, payload, values) suitable as a metrics label.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"bad block value ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What a value says about itself, after its checksums have been verified."""

    block_hash: BlockHash
    codec: str
    dtype: str  # the dtype the block had when encoded, by torch name
    shape: tuple[int, ...]  # [layers, 2, kv_heads, block_tokens, head_dim]
    params: dict[str, int]
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) per section
    header_bytes: int
    payload_bytes: int


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _layout_record(layout: Sequence[Section]) -> list[list[object]]:
    return [[s.name, dtype_name(s.dtype), list(s.shape)] for s in layout]


def encode_block(kv: torch.Tensor, codec: str, block_hash: BlockHash) -> bytes:
    """kv: [layers, 2, kv_heads, block_tokens, head_dim] in the model's dtype, on any device.

    Raises InvalidArgument for a malformed block or values the codec cannot represent.
    """
    impl = get_codec(codec)
    block_hash = as_block_hash(block_hash)
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2 or kv.numel() == 0:
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise InvalidArgument(
            f"kv must be [layers, 2, kv_heads, block_tokens, head_dim], got {shape}"
        )
    if dtype_name(kv.dtype) not in DTYPE_BYTES:
        raise InvalidArgument(f"kv dtype must be one of {sorted(DTYPE_BYTES)}, got {kv.dtype}")
    shape = (kv.shape[0], 2, kv.shape[2], kv.shape[3], kv.shape[4])
    layout = impl.layout(shape)
    tensors = impl.encode(kv)

    checksum = xxhash.xxh3_64()
    parts: list[bytes | memoryview] = []
    for section, tensor in zip(layout, tensors, strict=True):
        # [*section.shape] in section.dtype -> [nbytes] uint8 on the CPU; numpy lends the buffer.
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != section.nbytes:  # a codec bug, not a caller mistake
            raise RuntimeError(f"codec {codec} section {section.name}: {raw.nbytes} bytes")
        pad = bytes(_padded(section.nbytes) - section.nbytes)
        for part in (raw.data, pad):
            checksum.update(part)
            parts.append(part)
    payload_bytes = sum(_padded(s.nbytes) for s in layout)

    header = msgpack.packb(
        {
            "hash": bytes(block_hash),
            "codec": codec,
            "dtype": dtype_name(kv.dtype),
            "shape": list(shape),
            "params": impl.params(shape),
            "layout": _layout_record(layout),
            "payload_xxh3": checksum.intdigest(),
        }
    )
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), payload_bytes, 0)[:_CHECKED_PREAMBLE]
    header_sum = xxhash.xxh3_64_intdigest(head + header)
    return b"".join([head, struct.pack("<Q", header_sum), header, *parts])


def _int(value: object, what: str, maximum: int = 2**31) -> int:
    if type(value) is not int or not 0 < value <= maximum:
        raise BlockFormatError("header", f"{what} must be a positive int, got {value!r}")
    return value


def _ints(value: object, what: str, max_len: int = 8) -> tuple[int, ...]:
    if type(value) is not list or not 0 < len(value) <= max_len:
        raise BlockFormatError("header", f"{what} must be a list of 1..{max_len} ints")
    return tuple(_int(v, what) for v in value)


def _parse_header(raw: bytes) -> dict[str, object]:
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=256,
            max_bin_len=HASH_BYTES,
            max_array_len=16,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on hostile input; all are a bad value
        raise BlockFormatError(
            "header", f"unreadable msgpack header: {type(exc).__name__}"
        ) from None
    if type(header) is not dict or set(header) != _HEADER_KEYS:
        raise BlockFormatError("header", f"header must be a map with keys {sorted(_HEADER_KEYS)}")
    return header


def read_header(
    data: bytes | bytearray | memoryview, *, verify_payload: bool = True
) -> BlockHeader:
    """Verify a value's framing and checksums and return its header, without decoding tensors.

    The store can use this to refuse a Put whose value is damaged or names another hash.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    header_len, payload_len = _check_preamble(view)
    h = _parse_header(bytes(view[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len]))
    header = _checked_fields(h, header_len, payload_len)
    if (
        verify_payload
        and xxhash.xxh3_64_intdigest(view[PREAMBLE_BYTES + header_len :]) != h["payload_xxh3"]
    ):
        raise BlockFormatError("checksum", "payload checksum mismatch")
    return header


def _check_preamble(view: memoryview) -> tuple[int, int]:
    """The header's and the payload's lengths, once the preamble and the header's checksum
    hold."""
    if len(view) < PREAMBLE_BYTES:
        raise BlockFormatError(
            "truncated", f"{len(view)} bytes is shorter than the {PREAMBLE_BYTES}-byte preamble"
        )
    magic, version, header_len, payload_len, header_sum = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise BlockFormatError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r}")
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise BlockFormatError(
            "header", f"header length {header_len} outside 1..{MAX_HEADER_BYTES}"
        )
    if len(view) != PREAMBLE_BYTES + header_len + payload_len:
        raise BlockFormatError(
            "truncated",
            f"{len(view)} bytes, the preamble says {PREAMBLE_BYTES + header_len + payload_len}",
        )
    # The preamble layout is the same in every version, so the version is read before the
    # checksum (whose algorithm a later version may change).
    if version != FORMAT_VERSION:
        raise BlockFormatError(
            "version", f"format version {version}; this build reads {FORMAT_VERSION}"
        )
    summer = xxhash.xxh3_64(view[:_CHECKED_PREAMBLE])
    summer.update(view[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len])
    if summer.intdigest() != header_sum:
        raise BlockFormatError("checksum", "header checksum mismatch")
    return header_len, payload_len


def _checked_fields(h: dict[str, Any], header_len: int, payload_len: int) -> BlockHeader:
    """The parsed header's fields, each of the type and among the values this build reads."""
    if type(h["hash"]) is not bytes or len(h["hash"]) != HASH_BYTES:
        raise BlockFormatError("header", "hash must be 32 bytes")
    if type(h["codec"]) is not str or h["codec"] not in CODEC_NAMES:
        raise BlockFormatError(
            "codec", f"codec must be one of {', '.join(CODEC_NAMES)}, got {h['codec']!r}"
        )
    if type(h["dtype"]) is not str or h["dtype"] not in DTYPE_BYTES:
        raise BlockFormatError(
            "header", f"dtype must be one of {sorted(DTYPE_BYTES)}, got {h['dtype']!r}"
        )
    params = h["params"]
    if type(params) is not dict or not all(
        type(k) is str and type(v) is int for k, v in params.items()
    ):
        raise BlockFormatError("header", "params must map str to int")
    if type(h["payload_xxh3"]) is not int:
        raise BlockFormatError("header", "payload_xxh3 must be an int")
    return BlockHeader(
        block_hash=BlockHash(h["hash"]),
        codec=h["codec"],
        dtype=h["dtype"],
        shape=_ints(h["shape"], "shape"),
        params=params,
        layout=_layout(h["layout"]),
        header_bytes=header_len,
        payload_bytes=payload_len,
    )


def _layout(raw: Any) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """The payload's sections: [name, dtype, shape] each."""
    if type(raw) is not list or not raw:
        raise BlockFormatError("header", "layout must be a non-empty list")
    layout = []
    for entry in raw:
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str:
            raise BlockFormatError("header", "layout entries must be [name, dtype, shape]")
        if type(entry[1]) is not str or entry[1] not in SECTION_DTYPES:
            raise BlockFormatError(
                "header", f"section dtype must be one of {sorted(SECTION_DTYPES)}"
            )
        layout.append((entry[0], entry[1], _ints(entry[2], "section shape")))
    return tuple(layout)


def decode_block(
    data: bytes | bytearray | memoryview,
    *,
    expected_hash: BlockHash,
    geometry: KVGeometry,
    block_tokens: int,
    device: torch.device | str = "cpu",
    staging: "Staging | None" = None,
) -> torch.Tensor:
    """-> [layers, 2, kv_heads, block_tokens, head_dim] in geometry.dtype on `device`.

    Raises BlockFormatError when the value is damaged, from another format version, stored under
    another hash, or shaped for another geometry: it never returns a tensor it cannot vouch for.
    On CUDA, `staging` (a pinned ring) saves allocating pinned memory for each block.
    """
    checked = check_block(data, expected_hash, geometry, block_tokens)
    target = torch.device(device)
    if target.type == "cuda" and staging is not None:
        payload = staging.to_device(checked.payload, target)  # [P] on the GPU
    elif target.type == "cuda":
        payload = checked.host_copy()
        # One pinned staging copy and one asynchronous host-to-device transfer for the whole
        # payload; the sections are then views on the device. Work queued later on the same
        # stream (the codec's decode) is ordered after the copy.
        payload = payload.pin_memory().to(target, non_blocking=True)  # [P] on the GPU
    else:
        payload = checked.host_copy().to(target)
    kv = checked.codec.decode(checked.sections(payload), getattr(torch, geometry.dtype))
    # Checksums vouch for the bytes, not for the writer: NaN/inf (or a scale that overflows the
    # model dtype) would poison attention, so such a value is refused like a damaged one.
    # A sum is finite exactly when every element is (or a huge value overflowed it, which is
    # refused too); it is ~20x faster than torch.isfinite(kv).all() on CPU.
    if not bool(torch.isfinite(kv.sum(dtype=torch.float32))):
        raise BlockFormatError("values", "decoded block holds NaN or inf")
    return kv  # [L, 2, H, T, D]


def decode_block_into(
    data: bytes | bytearray | memoryview,
    out: torch.Tensor,
    *,
    expected_hash: BlockHash,
    geometry: KVGeometry,
    block_tokens: int,
    staging: "Staging | None" = None,
) -> torch.Tensor:
    """Decode a value into `out` ([L, 2, H, T, D] in geometry.dtype, any strides, on any device).

    Framing, checksums, hash and geometry are verified before anything is written (else
    BlockFormatError). The values' finiteness is not: the return value is a 0-dim float32 sum of
    the block, left on `out`'s device so that checking it does not wait for the GPU; the caller
    checks a run's sums at once and treats a block whose sum is not finite as damaged. On CUDA,
    `staging` moves the payload through pinned memory without allocating any per block.
    """
    checked = check_block(data, expected_hash, geometry, block_tokens)
    if out.device.type == "cuda":
        if staging is None:
            raise InvalidArgument("decoding into a CUDA tensor needs a pinned Staging ring")
        payload = staging.to_device(checked.payload, out.device)  # [P] uint8 on the GPU
    else:
        payload = checked.host_copy()
    return checked.decode_into(payload, out)


class Staging(Protocol):
    """Moves host bytes to a device through pinned memory (workers.kv.staging.PinnedRing)."""

    def to_device(self, data: memoryview, device: torch.device) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class CheckedBlock:
    """A verified value: its codec, section layout and the payload's bytes (not yet copied).

    Everything its bytes can say has been checked; only the decoded values' finiteness is left
    (`decode_into` returns their sum for the caller to check).
    """

    codec: Codec
    layout: tuple[Section, ...]
    offsets: tuple[int, ...]
    payload: memoryview

    def host_copy(self) -> torch.Tensor:
        # A private, writable, malloc-aligned copy: the sections are views into it, and
        # torch.frombuffer over the caller's immutable bytes would alias memory torch may not
        # write.
        return torch.frombuffer(bytearray(self.payload), dtype=torch.uint8)  # [P]

    def sections(self, payload: torch.Tensor) -> list[torch.Tensor]:
        return [
            payload[start : start + section.nbytes].view(section.dtype).view(section.shape)
            for start, section in zip(self.offsets, self.layout, strict=True)
        ]

    def decode_into(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Decode `payload` (this block's payload bytes, uint8, on out's device) into `out`;
        returns the 0-dim float32 sum of the block, not waited for."""
        self.codec.decode_into(self.sections(payload.to(out.device)), out)
        return out.sum(dtype=torch.float32)


def check_block(
    data: bytes | bytearray | memoryview,
    expected_hash: BlockHash,
    geometry: KVGeometry,
    block_tokens: int,
) -> CheckedBlock:
    """Verify everything about a value that its bytes can say, before any tensor is built;
    BlockFormatError when it is damaged, foreign or shaped for another geometry."""
    expected_hash = as_block_hash(expected_hash)
    if type(block_tokens) is not int or block_tokens <= 0:
        raise InvalidArgument(f"block_tokens must be a positive int, got {block_tokens!r}")
    header = read_header(data)
    if header.block_hash != expected_hash:
        raise BlockFormatError("hash", "the value was stored under another block hash")
    if header.dtype != geometry.dtype:
        raise BlockFormatError(
            "geometry", f"block dtype {header.dtype}, model runs {geometry.dtype}"
        )
    shape = geometry.block_shape(block_tokens)
    if header.shape != shape:
        raise BlockFormatError(
            "geometry", f"block shape {list(header.shape)}, expected {list(shape)}"
        )
    codec = get_codec(header.codec)
    layout = codec.layout(shape)
    if header.params != codec.params(shape):
        raise BlockFormatError(
            "header", f"codec params {header.params}, expected {codec.params(shape)}"
        )
    expected_layout = tuple((s.name, dtype_name(s.dtype), s.shape) for s in layout)
    if header.layout != expected_layout:
        raise BlockFormatError(
            "header", f"section layout {header.layout}, expected {expected_layout}"
        )
    if header.payload_bytes != sum(_padded(s.nbytes) for s in layout):
        raise BlockFormatError(
            "payload", f"payload of {header.payload_bytes} bytes does not match the layout"
        )
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    payload = view[PREAMBLE_BYTES + header.header_bytes :]
    offsets = []
    offset = 0
    for section in layout:
        if any(payload[offset + section.nbytes : offset + _padded(section.nbytes)]):
            raise BlockFormatError("payload", f"non-zero padding after section {section.name}")
        offsets.append(offset)
        offset += _padded(section.nbytes)
    return CheckedBlock(codec, layout, tuple(offsets), payload)


def encoded_bytes_per_token(codec: str, geometry: KVGeometry, block_tokens: int) -> float:
    """Payload bytes per token of a block of this geometry (the header, ~200 bytes, excluded)."""
    shape = geometry.block_shape(block_tokens)
    return sum(_padded(s.nbytes) for s in get_codec(codec).layout(shape)) / block_tokens
