"""Protobuf encoding of the two bulk messages, `GetChunk` and `PutChunk`, written by hand.

Why: the protobuf runtime copies a value into the message and again when serializing, and copies
it on parsing; on these machines that runs at about 1 GB/s, slower than Redis itself. Here a value
is copied once when a message is built (one `bytes.join`) and not at all when it is parsed (the
decoded piece is a `memoryview` into the received message).

The bytes are exactly what `store_pb2` produces for the same message (fields in field-number
order, defaults omitted), and the decoders accept any valid encoding (any field order, unknown
fields skipped), so clients in other languages, grpcurl and this code interoperate. A test checks
both directions against `store_pb2`. Everything else on the wire goes through `store_pb2`.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvpool.errors import InvalidArgument

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of a value: `ValuePiece` (Get, by `index`) or `BlockPiece` (Put, by `key`)."""

    data: bytes | memoryview = b""
    last: bool = False
    size: int = 0  # total value length, on a value's first piece
    index: int = 0  # Get: position of the key in the request
    missing: bool = False  # Get: the key is absent
    key: str = ""  # Put: set on a block's first piece


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _get_piece_parts(p: Piece) -> list[bytes | memoryview]:
    head = bytearray()
    if p.index:
        head += b"\x08" + _varint(p.index)
    tail = bytearray()
    if p.last:
        tail += b"\x18\x01"
    if p.missing:
        tail += b"\x20\x01"
    if p.size:
        tail += b"\x28" + _varint(p.size)
    n = len(p.data)
    if n:
        head += b"\x12" + _varint(n)
    body = len(head) + n + len(tail)
    return [b"\x0a" + _varint(body), bytes(head), p.data, bytes(tail)]


def encode_get_chunk(pieces: Sequence[Piece]) -> bytes:
    """`GetChunk(pieces=[ValuePiece(...), ...]).SerializeToString()`, with one copy of the data."""
    parts: list[bytes | memoryview] = []
    for p in pieces:
        parts += _get_piece_parts(p)
    return b"".join(parts)


def encode_put_chunk(ttl_s: int, pieces: Sequence[Piece]) -> bytes:
    """`PutChunk(ttl_s=..., pieces=[BlockPiece(...), ...]).SerializeToString()`."""
    parts: list[bytes | memoryview] = []
    if ttl_s:
        parts.append(b"\x08" + _varint(ttl_s))
    for p in pieces:
        head = bytearray()
        if p.key:
            key = p.key.encode()
            head += b"\x0a" + _varint(len(key)) + key
        if p.size:
            head += b"\x10" + _varint(p.size)
        n = len(p.data)
        if n:
            head += b"\x1a" + _varint(n)
        tail = b"\x20\x01" if p.last else b""
        body = len(head) + n + len(tail)
        parts += [b"\x12" + _varint(body), bytes(head), p.data, tail]
    return b"".join(parts)


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) for each field: an int for varints, a memoryview for LEN fields."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield field, value
        elif wire == _LEN:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise InvalidArgument("malformed message: a field runs past its end")
            yield field, buf[pos : pos + n]
            pos += n
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4  # unknown fixed-width field: skip
        else:
            raise InvalidArgument(f"malformed message: wire type {wire}")
    if pos != end:
        raise InvalidArgument("malformed message: truncated")


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArgument("malformed message: bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _ints(value: int | memoryview) -> int:
    if isinstance(value, memoryview):
        raise InvalidArgument("malformed message: a number field holds bytes")
    return value


def _view(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise InvalidArgument("malformed message: a bytes field holds a number")
    return value


def decode_get_chunk(message: bytes) -> list[Piece]:
    """Parse a `GetChunk`; each piece's data is a view into `message` (no copy)."""
    pieces = []
    for field, value in _fields(memoryview(message)):
        if field != 1:
            continue
        p: dict[str, object] = {}
        for f, v in _fields(_view(value)):
            if f == 1:
                p["index"] = _ints(v)
            elif f == 2:
                p["data"] = _view(v)
            elif f == 3:
                p["last"] = bool(_ints(v))
            elif f == 4:
                p["missing"] = bool(_ints(v))
            elif f == 5:
                p["size"] = _ints(v)
        pieces.append(Piece(**p))  # type: ignore[arg-type]
    return pieces


def decode_put_chunk(message: bytes) -> tuple[int, list[Piece]]:
    """Parse a `PutChunk` into (ttl_s, pieces); each piece's data is a view into `message`."""
    ttl_s = 0
    pieces = []
    for field, value in _fields(memoryview(message)):
        if field == 1:
            ttl_s = _ints(value)
        elif field == 2:
            p: dict[str, object] = {}
            for f, v in _fields(_view(value)):
                if f == 1:
                    # Undecodable bytes survive as U+FFFD, so the key check rejects them with
                    # the key rule in its message.
                    p["key"] = str(_view(v), "utf-8", "replace")
                elif f == 2:
                    p["size"] = _ints(v)
                elif f == 3:
                    p["data"] = _view(v)
                elif f == 4:
                    p["last"] = bool(_ints(v))
            pieces.append(Piece(**p))  # type: ignore[arg-type]
    return ttl_s, pieces
