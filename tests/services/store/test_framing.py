"""The hand-written encoding of GetChunk/PutChunk must be byte-for-byte protobuf."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpool.errors import InvalidArgument
from kvpool.v1 import store_pb2
from services.store.framing import (
    Piece,
    decode_get_chunk,
    decode_put_chunk,
    encode_get_chunk,
    encode_put_chunk,
)

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
data = st.binary(max_size=300)
keys = st.text("abcXYZ019:._-", max_size=40)

value_pieces = st.lists(
    st.builds(Piece, data=data, last=st.booleans(), size=u64, index=u32, missing=st.booleans()),
    max_size=5,
)
block_pieces = st.lists(
    st.builds(Piece, data=data, last=st.booleans(), size=u64, key=keys), max_size=5
)


def _pb_get(pieces):
    return store_pb2.GetChunk(
        pieces=[
            store_pb2.ValuePiece(
                index=p.index, data=bytes(p.data), last=p.last, missing=p.missing, size=p.size
            )
            for p in pieces
        ]
    )


def _pb_put(ttl, pieces):
    return store_pb2.PutChunk(
        ttl_s=ttl,
        pieces=[
            store_pb2.BlockPiece(key=p.key, size=p.size, data=bytes(p.data), last=p.last)
            for p in pieces
        ],
    )


def _plain(p: Piece) -> Piece:
    return Piece(bytes(p.data), p.last, p.size, p.index, p.missing, p.key)


@given(value_pieces)
def test_get_chunk_encoding_is_protobufs(pieces):
    encoded = encode_get_chunk(pieces)
    assert encoded == _pb_get(pieces).SerializeToString()
    assert [_plain(p) for p in decode_get_chunk(encoded)] == [_plain(p) for p in pieces]


@given(u32, block_pieces)
def test_put_chunk_encoding_is_protobufs(ttl, pieces):
    encoded = encode_put_chunk(ttl, pieces)
    assert encoded == _pb_put(ttl, pieces).SerializeToString()
    got_ttl, got = decode_put_chunk(encoded)
    assert got_ttl == ttl
    assert [_plain(p) for p in got] == [_plain(p) for p in pieces]


def test_decoders_skip_unknown_fields_and_accept_any_field_order():
    # A future field 9 (varint), 10 (fixed64) and 11 (bytes) in the piece, fields reversed.
    piece = b"\x20\x01" + b"\x1a\x03abc" + b"\x10\x03" + b"\x0a\x01k"
    piece += b"\x48\x05" + b"\x51" + b"\x00" * 8 + b"\x5a\x02zz"
    message = b"\x12" + bytes([len(piece)]) + piece + b"\x08\x07"
    ttl, pieces = decode_put_chunk(message)
    assert ttl == 7
    assert [_plain(p) for p in pieces] == [Piece(b"abc", True, 3, key="k")]


def test_decoded_data_is_a_view_not_a_copy():
    message = encode_get_chunk([Piece(b"x" * 1000, True, 1000, index=1)])
    (piece,) = decode_get_chunk(message)
    assert isinstance(piece.data, memoryview) and piece.data.obj is message


@pytest.mark.parametrize(
    "message",
    [
        b"\x12\x05ab",  # a length past the end
        b"\x12",  # a tag with no length
        b"\x12\x02\x0a\xff",  # a key whose length runs past its piece
        b"\x0f",  # wire type 7 does not exist
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint longer than 64 bits
        b"\x0a\x01x",  # ttl_s (a number) sent as bytes
    ],
)
def test_malformed_put_messages_are_invalid_argument(message):
    with pytest.raises(InvalidArgument, match="malformed message"):
        decode_put_chunk(message)
