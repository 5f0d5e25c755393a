"""Cutting values into stream messages and joining them back, both directions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.errors import DataLoss, InvalidArgument, ResourceExhausted
from services.store.chunks import (
    BlockAssembler,
    ValueAssembler,
    get_chunks,
    put_chunks,
)
from services.store.framing import Piece, encode_get_chunk, encode_put_chunk

CHUNK = 64

values = st.lists(st.one_of(st.none(), st.binary(max_size=5 * CHUNK)), max_size=12)


@settings(max_examples=200)
@given(values)
def test_get_stream_round_trips_and_bounds_every_message(vals):
    messages = list(get_chunks(enumerate(vals), CHUNK))
    assembler = ValueAssembler(len(vals))
    got = {}
    for message in messages:
        # a chunk's worth of data plus a few bytes of framing per piece
        assert len(message) <= CHUNK + 16 * len(vals) + 16
        for index, value in assembler.add(message):
            assert index not in got
            got[index] = value
    assert not assembler.in_value
    assert got == dict(enumerate(vals))


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=5 * CHUNK), max_size=12), st.integers(0, 10**6))
def test_put_stream_round_trips_with_ttl_in_the_first_message(vals, ttl):
    items = [(f"k{i}", v) for i, v in enumerate(vals)]
    assembler = BlockAssembler(max_block_bytes=5 * CHUNK)
    blocks = []
    for n, message in enumerate(put_chunks(items, ttl, CHUNK)):
        blocks += [(key, bytes(value)) for key, value in assembler.add(message, first=n == 0)]
    assembler.finish()
    assert blocks == items
    assert assembler.ttl_s == (ttl if items else 0)


def test_small_values_share_a_message_and_large_ones_are_cut():
    messages = list(get_chunks(enumerate([b"a" * 10, b"b" * 10, b"c" * 200]), CHUNK))
    # 10 + 10 bytes together, then 200 bytes in four pieces of at most 64
    assert len(messages) == 1 + 4


def test_an_oversized_block_is_refused_from_its_first_piece_naming_the_limit():
    first = encode_put_chunk(0, [Piece(b"x" * 10, last=False, size=1000, key="big")])
    with pytest.raises(ResourceExhausted, match=r"1000 bytes; the limit is 100 bytes"):
        list(BlockAssembler(max_block_bytes=100).add(first, first=True))


def test_a_block_larger_than_it_announced_is_refused():
    message = encode_put_chunk(0, [Piece(b"x" * 20, last=True, size=10, key="k")])
    with pytest.raises(InvalidArgument, match="announced 10 bytes and sent 20"):
        list(BlockAssembler(1000).add(message, first=True))


def test_a_stream_that_ends_inside_a_block_is_refused():
    assembler = BlockAssembler(1000)
    message = encode_put_chunk(0, [Piece(b"x" * 5, last=False, size=10, key="k")])
    assert list(assembler.add(message, first=True)) == []
    with pytest.raises(InvalidArgument, match="ended inside block 'k'"):
        assembler.finish()


def test_a_block_without_a_key_is_refused_with_the_key_rule():
    message = encode_put_chunk(0, [Piece(b"x", last=True)])
    with pytest.raises(InvalidArgument, match="invalid key '': keys are 1 to 200"):
        list(BlockAssembler(1000).add(message, first=True))


def test_malformed_keys_are_refused_with_the_rule():
    message = encode_put_chunk(0, [Piece(b"x", last=True, size=1, key="no spaces")])
    with pytest.raises(InvalidArgument, match="1 to 200 characters"):
        list(BlockAssembler(1000).add(message, first=True))


def test_a_truncated_value_from_the_server_is_data_loss():
    message = encode_get_chunk([Piece(b"abc", last=True, size=5, index=0)])
    with pytest.raises(DataLoss, match="announced 5"):
        list(ValueAssembler(1).add(message))


def test_a_piece_for_a_key_outside_the_request_is_data_loss():
    message = encode_get_chunk([Piece(b"a", last=True, size=1, index=3)])
    with pytest.raises(DataLoss, match="key #3 of a 1-key request"):
        list(ValueAssembler(1).add(message))
