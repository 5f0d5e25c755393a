"""L1, write-behind and the prefix's lookup and fetch (workers.fetch), each against a small
in-memory stand-in for the store."""

import threading

import pytest
import torch

from kvpool.errors import DataLoss, Unavailable
from workers.fetch import Decoded, Tiers, fetch_run, locate
from workers.kv.assembly import Refused
from workers.kv.block import BlockFormatError
from workers.kv.hashing import BlockHash, Namespace, block_key, chain_hashes
from workers.tiers import LocalBlocks, WriteBehind

NS = Namespace(model_fingerprint="f" * 64, codec="fp16", block_tokens=4)


def hashes(n: int) -> list[BlockHash]:
    return chain_hashes(NS, list(range(4 * n)))


def block(value: float, size: int = 16) -> torch.Tensor:
    return torch.full((1, 2, 1, size // 4, 2), value)  # [layers, 2, heads, tokens, head_dim]


class DictStore:
    """The four BlockStore calls over a dict; `fail` makes every call raise like a down store."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail = False
        self.lookups = 0
        self.deleted: list[str] = []

    def _check(self) -> None:
        if self.fail:
            raise Unavailable("store is down")

    def lookup(self, keys):
        self._check()
        self.lookups += 1
        n = 0
        for key in keys:
            if key not in self.data:
                break
            n += 1
        return n

    def get_many(self, keys):
        self._check()
        return {k: self.data[k] for k in keys if k in self.data}

    def get_iter(self, keys):
        self._check()
        for key in keys:
            yield key, self.data.get(key)

    def put_many(self, items, ttl_s=None):
        self._check()
        self.data.update(items)
        return len(items)

    def delete(self, keys):
        self._check()
        self.deleted.extend(keys)
        return sum(self.data.pop(k, None) is not None for k in keys)


def encode(t: torch.Tensor, h: BlockHash) -> bytes:
    return bytes(h) + t.numpy().tobytes()


def decode(data: bytes, h: BlockHash) -> torch.Tensor:
    if data[:32] != bytes(h):
        raise DataLoss("stored under another hash")
    return torch.frombuffer(bytearray(data[32:]), dtype=torch.float32).view(1, 2, 1, 4, 2)


def test_l1_is_byte_bounded_and_evicts_least_recently_used():
    one = block(1.0)
    size = one.numel() * one.element_size()
    local = LocalBlocks(capacity_bytes=2 * size)
    h = hashes(3)
    local.put(h[0], block(0.0))
    local.put(h[1], block(1.0))
    assert len(local.prefix(h[:1])) == 1  # touches h0, so h1 is now the oldest
    local.put(h[2], block(2.0))
    assert h[0] in local and h[2] in local and h[1] not in local
    stats = local.stats()
    assert stats.bytes == 2 * size and stats.blocks == 2 and stats.evictions == 1


def test_l1_prefix_stops_at_the_first_gap():
    local = LocalBlocks(1 << 20)
    h = hashes(3)
    local.put(h[0], block(0.0))
    local.put(h[2], block(2.0))
    found = local.prefix(h)
    assert len(found) == 1 and float(found[0][0, 0, 0, 0, 0]) == 0.0


def test_l1_ignores_a_block_larger_than_its_capacity():
    local = LocalBlocks(capacity_bytes=8)
    local.put(hashes(1)[0], block(1.0))
    assert local.stats().blocks == 0


def test_write_behind_puts_blocks_and_fills_l1_with_what_the_store_returns():
    store, local = DictStore(), LocalBlocks(1 << 20)
    writer = WriteBehind(encode, decode, local, store)
    h = hashes(2)
    assert writer.submit([(h[0], block(0.5)), (h[1], block(1.5))])
    assert writer.flush(5)
    assert set(store.data) == {block_key(x) for x in h}
    assert torch.equal(local.prefix(h)[1], block(1.5))
    assert writer.stats().stored == 2
    writer.close()


def test_write_behind_drops_rather_than_blocks_when_full():
    gate = threading.Event()

    def slow_encode(t, h):
        gate.wait(5)
        return encode(t, h)

    writer = WriteBehind(
        slow_encode, decode, LocalBlocks(1 << 20), DictStore(), max_pending_blocks=2
    )
    h = hashes(3)
    assert writer.submit([(h[0], block(0.0)), (h[1], block(1.0))])
    assert not writer.submit([(h[2], block(2.0))])  # returns at once; the queue is full
    # A fetched run's copies for L1 are dropped too, and counted apart: the store has them.
    assert not writer.keep([(h[2], block(2.0))], [])
    gate.set()
    assert writer.flush(5)
    stats = writer.stats()
    assert stats.dropped == 1 and stats.dropped_copies == 1 and stats.stored == 2
    writer.close()


def test_write_behind_survives_a_failing_store():
    store = DictStore()
    store.fail = True
    local = LocalBlocks(1 << 20)
    writer = WriteBehind(encode, decode, local, store)
    h = hashes(1)
    writer.submit([(h[0], block(1.0))])
    assert writer.flush(5)
    assert writer.stats().failed == 1
    assert h[0] in local  # this worker still reuses it
    store.fail = False
    writer.submit([(hashes(2)[1], block(2.0))])
    assert writer.flush(5) and writer.stats().stored == 1
    writer.close()


def find_prefix(h, local, store, decode):
    """The worker's lookup then fetch of a whole cached prefix, decoded block by block."""
    tiers = Tiers(local, None, store)
    found = locate(h, tiers)
    decoded = Decoded(decode, local)
    fetched = fetch_run(found, h, len(found.local), tiers, decoded)
    return found, fetched, found.local + decoded.blocks


def test_prefix_takes_l1_first_then_one_lookup_for_the_rest():
    store, local = DictStore(), LocalBlocks(1 << 20)
    h = hashes(4)
    local.put(h[0], block(0.0))
    for i in (1, 2):
        store.data[block_key(h[i])] = encode(block(float(i)), h[i])
    found, fetched, blocks = find_prefix(h, local, store, decode)
    assert (len(found.local), fetched.store_blocks) == (1, 2)
    assert store.lookups == 1
    assert [float(b[0, 0, 0, 0, 0]) for b in blocks] == [0.0, 1.0, 2.0]
    assert h[1] in local and h[2] in local  # fetched blocks now live in L1 too


def test_prefix_refuses_a_corrupt_block_deletes_it_and_stops_there():
    store, local = DictStore(), LocalBlocks(1 << 20)
    h = hashes(3)
    store.data[block_key(h[0])] = encode(block(0.0), h[0])
    store.data[block_key(h[1])] = encode(block(1.0), h[2])  # a value stored under the wrong key
    store.data[block_key(h[2])] = encode(block(2.0), h[2])
    _, fetched, blocks = find_prefix(h, local, store, decode)
    assert fetched.store_blocks == 1 and fetched.corrupt_blocks == 1 and len(blocks) == 1
    assert store.deleted == [block_key(h[1])] and block_key(h[1]) not in store.data


def test_prefix_is_a_miss_not_an_error_when_the_store_is_down():
    store, local = DictStore(), LocalBlocks(1 << 20)
    store.fail = True
    h = hashes(2)
    local.put(h[0], block(0.0))
    found, fetched, blocks = find_prefix(h, local, store, decode)
    assert len(found.local) == 1 and fetched.store_blocks == 0 and found.store_error
    assert not found.node_error and len(blocks) == 1


@pytest.mark.parametrize("with_store", [True, False])
def test_prefix_of_nothing_is_empty(with_store):
    found, fetched, blocks = find_prefix(
        [], LocalBlocks(1 << 20), DictStore() if with_store else None, decode
    )
    assert blocks == [] and not found.store_error and not fetched.store_error


class DictNode(DictStore):
    """The node tier's three calls over a dict: refs are the keys themselves."""

    def refs(self, keys):
        return [key for key in keys[: self.lookup(keys)]]

    def read(self, refs):
        return [self.data[ref] for ref in refs]


class RefusesLate:
    """A sink that takes every value and refuses one only at its finish, as an assembly on a GPU
    does once the whole run's checksums are in."""

    def __init__(self, refused: int) -> None:
        self.added: list[BlockHash] = []
        self.refused = refused

    def add(self, data, block_hash, tier):
        self.added.append(block_hash)

    def finish(self):
        return Refused(self.refused, BlockFormatError("checksum", "payload checksum mismatch"))


@pytest.mark.parametrize(
    ("refused", "node_blocks", "store_blocks", "deleted_from"),
    [(1, 1, 0, "node"), (2, 2, 0, "store"), (3, 2, 1, "store")],
)
def test_a_block_refused_at_the_finish_ends_the_run_there(
    refused, node_blocks, store_blocks, deleted_from
):
    node, store, local = DictNode(), DictStore(), LocalBlocks(1 << 20)
    h = hashes(4)
    for i in (0, 1):
        node.data[block_key(h[i])] = encode(block(float(i)), h[i])
    for i in (2, 3):
        store.data[block_key(h[i])] = encode(block(float(i)), h[i])
    tiers = Tiers(local, node, store)
    found = locate(h, tiers)
    assert (len(found.node_refs), found.store_blocks) == (2, 2)
    fetched = fetch_run(found, h, 0, tiers, RefusesLate(refused))
    assert (fetched.node_blocks, fetched.store_blocks) == (node_blocks, store_blocks)
    assert fetched.corrupt_blocks == 1
    tier = node if deleted_from == "node" else store
    assert tier.deleted == [block_key(h[refused])]
    assert (node if tier is store else store).deleted == []
