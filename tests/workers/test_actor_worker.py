"""KVWorker without Ray: two workers in this process share one real KVStore (gRPC, memory
backend). The Ray and gateway layers are tested in tests/services/gateway."""

import pytest

from kvpool.errors import InvalidArgument
from tests.support.work import make_worker, run
from workers.api import (
    ChatMessage,
    PromptInput,
    SamplingParams,
    WorkDone,
    WorkerConfig,
    WorkRequest,
)
from workers.kv.hashing import block_key, chain_hashes
from workers.worker import KVWorker

DOC = (
    "A KV cache stores the attention keys and values of every token a model has seen, so the "
    "next token needs one step instead of a pass over the whole text. "
) * 6


def test_worker_b_reuses_blocks_that_worker_a_stored(pair):
    a, b = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Worker reuse. " + DOC)))
    params = SamplingParams(max_new_tokens=24)
    cold = run(a, WorkRequest(prompt, params, read_cache=False))
    first = run(a, WorkRequest(prompt, params))
    assert a.flush(10)
    assert first.usage.cached_store_tokens == 0

    shared = run(b, WorkRequest(prompt, params))
    full_blocks = len(prompt) // 16 * 16
    assert shared.usage.cached_store_tokens == min(full_blocks, len(prompt) - 1)
    assert shared.usage.cached_local_tokens == 0
    assert shared.token_ids == cold.token_ids == first.token_ids

    again = run(b, WorkRequest(prompt, params))  # now from b's own L1
    assert again.usage.cached_local_tokens == shared.usage.cached_store_tokens
    assert again.token_ids == cold.token_ids


def test_output_blocks_are_written_behind_too(pair, store):
    a, _ = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Output blocks. " + DOC[:200])))
    done = run(a, WorkRequest(prompt, SamplingParams(max_new_tokens=40)))
    assert a.flush(10)
    fed = [*prompt, *done.token_ids][:-1]  # the last sampled token was never fed
    keys = [block_key(h) for h in chain_hashes(a.namespace(""), fed)]
    from services.store.client import StoreClient

    with StoreClient(store.target) as client:
        assert client.lookup(keys) == len(keys) == len(fed) // 16


def test_resume_from_prior_output_continues_the_same_greedy_text(pair):
    a, b = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Resume me. " + DOC)))
    params = SamplingParams(max_new_tokens=30)
    whole = run(a, WorkRequest(prompt, params))
    assert a.flush(10)
    resumed = run(b, WorkRequest(prompt, params, prior_output=whole.token_ids[:13]))
    assert resumed.token_ids == whole.token_ids
    assert resumed.usage.completion_tokens == 30
    assert resumed.usage.cached_tokens > len(prompt) // 2


def test_tenants_do_not_share_blocks(pair):
    a, b = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Tenant wall. " + DOC)))
    params = SamplingParams(max_new_tokens=4)
    run(a, WorkRequest(prompt, params, tenant="acme"))
    assert a.flush(10)
    other = run(b, WorkRequest(prompt, params, tenant="globex"))
    assert other.usage.cached_tokens == 0
    same = run(b, WorkRequest(prompt, params, tenant="acme"))
    assert same.usage.cached_store_tokens > 0


def test_a_corrupt_stored_block_is_refused_deleted_and_recomputed(pair, store):
    a, b = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Corruption. " + DOC)))
    params = SamplingParams(max_new_tokens=16)
    clean = run(a, WorkRequest(prompt, params))
    assert a.flush(10)
    keys = [block_key(h) for h in chain_hashes(a.namespace(""), prompt)]
    from services.store.client import StoreClient

    with StoreClient(store.target) as client:
        value = bytearray(client.get_many([keys[2]])[keys[2]])
        value[-5] ^= 0x40  # one flipped payload bit
        client.put_many([(keys[2], bytes(value))])
        before = b.stats().corrupt_blocks
        served = run(b, WorkRequest(prompt, params))
        assert b.stats().corrupt_blocks == before + 1
        assert served.usage.cached_store_tokens == 2 * 16  # blocks 0 and 1 only
        assert served.token_ids == clean.token_ids
        assert b.flush(10)
        # b recomputed block 2 and wrote it back, so the store is whole again.
        assert client.lookup(keys) == len(keys)


def test_a_dead_store_is_a_miss_not_an_error():
    worker = KVWorker(
        WorkerConfig(model="tiny-random", codec="fp16", block_tokens=16,
                     store_target="127.0.0.1:9", store_timeout_s=0.2),
        "lonely",
    )  # fmt: skip
    try:
        prompt = tuple(worker.prompts.encode_input(PromptInput(prompt=DOC)))
        done = run(worker, WorkRequest(prompt, SamplingParams(max_new_tokens=4)))
        assert done.usage.cached_tokens == 0
        assert worker.stats().store_errors == 1
        assert worker.flush(10)
        assert worker.stats().writes.failed > 0
        # L1 still serves this worker.
        assert (
            run(
                worker, WorkRequest(prompt, SamplingParams(max_new_tokens=4))
            ).usage.cached_local_tokens
            > 0
        )
    finally:
        worker.close()


def test_prefill_stores_every_full_block(pair):
    a, b = pair
    prompt = a.prompts.encode_input(PromptInput(prompt="Prefill this document. " + DOC))
    result = b.prefill(prompt)
    assert result.stored_tokens == len(prompt) // 16 * 16 and result.cached_tokens == 0
    assert a.prefill(prompt).cached_tokens == result.stored_tokens


def test_cancel_stops_a_generation_after_the_current_token(pair):
    a, _ = pair
    prompt = tuple(a.prompts.encode_input(PromptInput(prompt="Cancel me")))
    stream = a.generate(WorkRequest(prompt, SamplingParams(max_new_tokens=200), request_id="r1"))
    next(stream)
    a.cancel("r1")
    rest = list(stream)
    assert len(rest) <= 1 and not any(isinstance(i, WorkDone) for i in rest)


def test_session_turns_in_messages_form_append_to_the_history(pair):
    a, _ = pair
    first = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi!")]
    history = a.prompts.encode_input(PromptInput(messages=tuple(first)))
    reply = run(a, WorkRequest(tuple(history), SamplingParams(max_new_tokens=8))).token_ids
    so_far = [*history, *reply]
    turn = a.prompts.encode_input(PromptInput(messages=(ChatMessage("user", "And then?"),)), so_far)
    assert turn[: len(so_far)] == so_far
    text = a.prompts.decode(turn[len(so_far) :])
    assert text.endswith("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful" not in text  # no second default system prompt
    with pytest.raises(InvalidArgument, match="system message"):
        a.prompts.encode_input(PromptInput(messages=(ChatMessage("system", "x"),)), so_far)


@pytest.mark.model
def test_smollm2_int8_blocks_from_another_worker_keep_greedy_output(store):
    a = make_worker(store, "smol-a", model="smollm2-135m", codec="int8", block_tokens=64)
    b = make_worker(store, "smol-b", model="smollm2-135m", codec="int8", block_tokens=64)
    try:
        messages = (ChatMessage("user", "Summarize in one sentence:\n" + DOC),)
        prompt = tuple(a.prompts.encode_input(PromptInput(messages=messages)))
        params = SamplingParams(max_new_tokens=24)
        cold = run(a, WorkRequest(prompt, params, read_cache=False))
        assert a.flush(30)
        warm = run(b, WorkRequest(prompt, params))
        assert warm.usage.cached_store_tokens == len(prompt) // 64 * 64
        assert warm.token_ids == cold.token_ids
    finally:
        a.close()
        b.close()
