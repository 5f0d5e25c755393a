"""Values in Redis damaged behind kvpool's back (written here with redis-py): each one is
detected, counted, deleted and recomputed, and the output stays exactly the no-cache output."""

import pytest
import redis
import torch

from tests.faults.conftest import BLOCK_TOKENS
from tests.faults.support import gateway_metrics, metric
from workers.api import PromptInput
from workers.kv.block import PREAMBLE_BYTES, encode_block, read_header
from workers.kv.hashing import block_key, chain_hashes

pytestmark = pytest.mark.integration

DOC = (
    "A prefix cache keys each block of attention state by a hash of every token before it, so "
    "a damaged block must never be taken for the real one: the reader checks it, drops it and "
    "computes the block again. "
) * 2
DAMAGED = 2  # the block that gets damaged; blocks 0 and 1 stay good


def _flip(value: bytes, at: int) -> bytes:
    data = bytearray(value)
    data[at] ^= 0x10
    return bytes(data)


def _other_geometry(value: bytes, stack, block_hash) -> bytes:
    """A well-formed value under the right hash, shaped for another model (a buggy writer)."""
    kv = torch.ones(1, 2, 1, BLOCK_TOKENS, 8)  # [layers, 2, kv_heads, block_tokens, head_dim]
    return encode_block(kv, stack.gateway.pool.info.codec, block_hash)


# name -> how to make the bad value from (good value, the value of the same tokens for another
# tenant, the value of block 0, the stack, the damaged block's hash)
CORRUPTIONS = {
    "payload bit flip": lambda v, o, b0, s, h: _flip(v, len(v) - 5),
    "header bit flip": lambda v, o, b0, s, h: _flip(v, PREAMBLE_BYTES + 3),
    "truncated": lambda v, o, b0, s, h: v[: len(v) // 2],
    "empty": lambda v, o, b0, s, h: b"",
    "junk": lambda v, o, b0, s, h: bytes((i * 37) % 256 for i in range(len(v))),
    "another tenant's block": lambda v, o, b0, s, h: o,
    "another position's block": lambda v, o, b0, s, h: b0,
    "another geometry": lambda v, o, b0, s, h: _other_geometry(v, s, h),
}


@pytest.fixture(scope="module")
def raw_redis(stack):
    client = redis.Redis.from_url(stack.redis.url)
    yield client
    client.close()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_block_is_refused_counted_deleted_and_recomputed(stack, raw_redis, kind):
    client, gateway = stack.client, stack.gateway
    text = f"Corruption case {kind}. {DOC}"
    tokens = gateway.pool.prompts.encode_input(PromptInput(prompt=text))
    assert len(tokens) >= (DAMAGED + 2) * BLOCK_TOKENS

    cold = client.generate(token_ids=tokens, max_new_tokens=8)
    assert cold.usage["cached_tokens"] == 0  # the no-cache reference
    client.generate(token_ids=tokens, max_new_tokens=1, tenant="other")
    stack.flush()
    keys = [block_key(h) for h in chain_hashes(stack.namespace(), tokens)]
    other_keys = [block_key(h) for h in chain_hashes(stack.namespace("other"), tokens)]
    good, other, first = raw_redis.mget([keys[DAMAGED], other_keys[DAMAGED], keys[0]])
    assert good and other and first and other != good

    damaged_hash = chain_hashes(stack.namespace(), tokens)[DAMAGED]
    bad = CORRUPTIONS[kind](good, other, first, stack, damaged_hash)
    assert bad != good
    raw_redis.set(keys[DAMAGED], bad)
    corrupt_before = metric(gateway_metrics(gateway), "kvpool_worker_corrupt_blocks_total")
    deletes_before = metric(
        stack.store.metrics(), "kvpool_store_requests_total", method="Delete", code="OK"
    )

    served = client.generate(token_ids=tokens, max_new_tokens=8)

    assert served.token_ids == cold.token_ids and served.text == cold.text
    assert served.usage["cached_tokens_by_tier"] == {
        "local": 0,
        "node": 0,
        "store": DAMAGED * BLOCK_TOKENS,
    }
    after = gateway_metrics(gateway)
    assert metric(after, "kvpool_worker_corrupt_blocks_total") == corrupt_before + 1
    assert (
        metric(stack.store.metrics(), "kvpool_store_requests_total", method="Delete", code="OK")
        == deletes_before + 1
    )
    # The worker recomputed the block and wrote it back: the store is whole again.
    stack.flush()
    healed = raw_redis.get(keys[DAMAGED])
    assert healed is not None and healed != bad
    assert read_header(healed).block_hash == damaged_hash  # checksums verified too
    again = client.generate(token_ids=tokens, max_new_tokens=8)
    assert again.token_ids == cold.token_ids
    assert again.usage["cached_tokens_by_tier"]["store"] > DAMAGED * BLOCK_TOKENS
