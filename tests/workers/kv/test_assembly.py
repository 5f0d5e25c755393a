"""`Assembly`: a prefix decoded block by block into one tensor gives exactly the cache that
decoding each block and concatenating them gives, for every codec and model dtype; a damaged
block is refused before it is written, and a block of NaN with valid checksums ends the prefix
when the run is finished."""

import os

import pytest
import torch

from tests.workers.kv.blocks import seeded_block
from tests.workers.kv.test_block import forge
from workers.kv.assembly import Assembly
from workers.kv.block import PREAMBLE_BYTES, BlockFormatError, decode_block, encode_block
from workers.kv.codec import CODEC_NAMES
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import BlockHash
from workers.kv.layout import blocks_to_cache
from workers.kv.staging import PinnedRing

TOKENS = 16
# KVPOOL_TEST_DEVICE=cuda runs these on a GPU (the pinned ring, its events and streams).
DEVICE = torch.device(os.environ.get("KVPOOL_TEST_DEVICE", "cpu"))
HASHES = [BlockHash(bytes([i]) * 32) for i in range(4)]


def encoded_run(codec: str, dtype: torch.dtype) -> tuple[KVGeometry, list[bytes]]:
    geometry = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8, dtype=str(dtype)[6:])
    shape = geometry.block_shape(TOKENS)
    blocks = [seeded_block(shape, i, 2.0, "outliers").to(dtype) for i in range(len(HASHES))]
    return geometry, [encode_block(b, codec, h) for b, h in zip(blocks, HASHES, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_an_assembled_cache_equals_the_concatenated_blocks(codec: str, dtype: torch.dtype):
    geometry, values = encoded_run(codec, dtype)
    decoded = [
        decode_block(v, expected_hash=h, geometry=geometry, block_tokens=TOKENS, device=DEVICE)
        for v, h in zip(values, HASHES, strict=True)
    ]
    into = Assembly(geometry, TOKENS, len(values), DEVICE)
    into.add(decoded[0])  # an L1 block, already decoded
    for value, block_hash in zip(values[1:], HASHES[1:], strict=True):
        into.add_encoded(value, block_hash)
    assert into.finish() is None and into.blocks == 4
    expected, got = blocks_to_cache(decoded), into.cache()
    for index in range(geometry.num_layers):
        assert torch.equal(got.layers[index].keys, expected.layers[index].keys)
        assert torch.equal(got.layers[index].values, expected.layers[index].values)
    for index, block in enumerate(decoded):
        assert torch.equal(into.block(index), block)


def test_a_damaged_block_is_refused_before_it_takes_a_slice():
    geometry, values = encoded_run("int8", torch.float32)
    into = Assembly(geometry, TOKENS, 3, DEVICE)
    into.add_encoded(values[0], HASHES[0])
    damaged = bytearray(values[1])
    damaged[-1] ^= 1
    with pytest.raises(BlockFormatError, match="checksum"):
        into.add_encoded(bytes(damaged), HASHES[1])
    with pytest.raises(BlockFormatError, match="another block hash"):
        into.add_encoded(values[1], HASHES[2])
    assert into.added == 1
    into.add_encoded(values[1], HASHES[1])  # the next good block takes the slice
    assert into.finish() is None and into.blocks == 2


def test_a_nan_block_with_valid_checksums_ends_the_prefix_at_finish():
    geometry, values = encoded_run("fp16", torch.float32)
    header_len = int.from_bytes(values[2][6:8], "little")
    payload = bytearray(values[2][PREAMBLE_BYTES + header_len :])
    payload[0:2] = b"\xff\xff"  # NaN as float16
    into = Assembly(geometry, TOKENS, 4, DEVICE)
    into.add_encoded(values[0], HASHES[0])
    into.add_encoded(values[1], HASHES[1])
    into.add_encoded(forge(values[2], payload=bytes(payload)), HASHES[2])  # checked late
    into.add_encoded(values[3], HASHES[3])
    refused = into.finish()
    assert refused is not None and refused.index == 2 and refused.error.reason == "values"
    assert into.blocks == 2
    cache = into.cache()
    assert cache.get_seq_length() == 2 * TOKENS
    assert all(bool(torch.isfinite(layer.keys).all()) for layer in cache.layers)


def test_an_assembly_holds_only_what_it_was_sized_for():
    geometry, values = encoded_run("fp16", torch.float32)
    into = Assembly(geometry, TOKENS, 1, DEVICE)
    into.add_encoded(values[0], HASHES[0])
    with pytest.raises(IndexError, match="room for 1 blocks"):
        into.add_encoded(values[1], HASHES[1])


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_staged_on_the_ring_threads_the_cache_is_the_same(codec: str):
    # The GPU path (verify and copy on the ring's threads, send and decode in order) on CPU
    # tensors: a run longer than the lease, so every slot is reused.
    geometry, values = encoded_run(codec, torch.float32)
    values, hashes = values * 5, HASHES * 5  # 20 blocks; hashes repeat, which is fine here
    decoded = [
        decode_block(v, expected_hash=h, geometry=geometry, block_tokens=TOKENS, device=DEVICE)
        for v, h in zip(values, hashes, strict=True)
    ]
    ring = PinnedRing(slots=4, threads=2)
    into = Assembly(geometry, TOKENS, len(values), DEVICE, ring)
    into.add(decoded[0])
    for value, block_hash in zip(values[1:], hashes[1:], strict=True):
        into.add_encoded(value, block_hash)
    assert into.finish() is None and into.blocks == 20
    for index, block in enumerate(decoded):
        assert torch.equal(into.block(index), block)
    assert ring.free == 4  # every slot was given back


def test_staged_refusals_show_at_finish_and_end_the_run_at_the_first():
    geometry, values = encoded_run("fp16", torch.float32)
    damaged = bytearray(values[2])
    damaged[-1] ^= 1
    ring = PinnedRing(slots=2, threads=2)
    into = Assembly(geometry, TOKENS, 4, DEVICE, ring)
    into.add_encoded(values[0], HASHES[0])
    into.add_encoded(values[1], HASHES[1])
    into.add_encoded(bytes(damaged), HASHES[2])  # no error yet: verified on a thread
    into.add_encoded(values[3], HASHES[3])
    refused = into.finish()
    assert refused is not None and refused.index == 2 and refused.error.reason == "checksum"
    assert into.blocks == 2 and into.cache().get_seq_length() == 2 * TOKENS
    assert ring.free == 2
