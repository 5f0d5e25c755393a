"""A request hashed at the edge is not hashed again: the worker goes on from the chain the
gateway computed to route it (WorkRequest.block_hashes), and refuses one that cannot be the
prompt's."""

import pytest

import workers.chain
from kvpool.errors import InvalidArgument
from tests.support.work import make_worker, run
from workers.api import SamplingParams, WorkRequest
from workers.chain import BlockChain

PROMPT = tuple(range(40, 40 + 3 * 16 + 5))  # three full blocks of 16 and a tail


@pytest.fixture(scope="module")
def worker(store):
    w = make_worker(store, "carried")
    yield w
    w.close()


def test_the_worker_goes_on_from_the_carried_chain(worker, monkeypatch):
    params = SamplingParams(max_new_tokens=20)
    expected = run(worker, WorkRequest(PROMPT, params, read_cache=False))
    known = tuple(BlockChain(worker.namespace(""), None).hashes(PROMPT))
    assert len(known) == 3
    hashed: list[list[int]] = []
    real = workers.chain.chain_hashes

    def counting(namespace, tokens, parent=None):
        hashed.append(list(tokens))
        return real(namespace, tokens, parent)

    monkeypatch.setattr(workers.chain, "chain_hashes", counting)
    worker.forget_local()
    done = run(worker, WorkRequest(PROMPT, params, block_hashes=known))
    assert done.token_ids == expected.token_ids
    assert done.usage.cached_store_tokens == 3 * 16  # found under the carried hashes
    # Only the blocks the output completed were hashed here, never the prompt's.
    assert hashed and all(tokens[0] != PROMPT[0] for tokens in hashed)
    assert sum(map(len, hashed)) == 16  # 53 + 20 tokens: one more full block


def test_a_chain_longer_than_the_prompt_is_refused(worker):
    known = tuple(BlockChain(worker.namespace(""), None).hashes(PROMPT + PROMPT))
    with pytest.raises(InvalidArgument, match="block_hashes has 6 hashes; the prompt has 3 full"):
        run(worker, WorkRequest(PROMPT, SamplingParams(max_new_tokens=1), block_hashes=known))


def test_a_chain_that_is_not_hashes_is_refused():
    with pytest.raises(InvalidArgument, match="block_hashes must be 32-byte hashes"):
        WorkRequest(PROMPT, SamplingParams(), block_hashes=(b"short",))
