"""Models with a native sliding window: their sliding layers keep only the window, and blocks are
still cut, stored under the plain full-prefix namespace, and reused.

Two tiny random models with a 48-token window, built here and loaded from a local folder like
any other model: a Mistral whose every layer slides, and a Qwen3 that alternates sliding and
full-attention layers.
"""

import pytest
import torch
from transformers import (
    DynamicCache,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvpool.errors import InvalidArgument
from services.store.client import StoreClient
from tests.support.work import run
from workers.api import PromptInput, SamplingParams, WorkDone, WorkerConfig, WorkRequest
from workers.kv.hashing import block_key, chain_hashes
from workers.kv.layout import blocks_to_cache, recent_blocks
from workers.models import cache_keyword
from workers.worker import KVWorker

WINDOW = 48
KEPT = WINDOW - 1  # DynamicSlidingWindowLayer keeps the last sliding_window - 1 tokens
BLOCK = 16
KINDS = ("mistral", "mixed")
DOC = (
    "A sliding window lets each layer attend to the most recent tokens only, so its cache "
    "stops growing once the window is full, however long the text runs. "
) * 4


def _config(kind: str, tokenizer):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        max_position_embeddings=4096,
        initializer_range=0.2,  # clear logit winners, as in tiny-random: no greedy near-ties
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if kind == "mistral":
        return MistralForCausalLM, MistralConfig(num_hidden_layers=2, **common)
    layer_types = ["sliding_attention", "full_attention"] * 2
    config = Qwen3Config(
        num_hidden_layers=4, use_sliding_window=True, layer_types=layer_types, **common
    )
    return Qwen3ForCausalLM, config


@pytest.fixture(scope="module")
def model_dirs(tiny, tmp_path_factory):
    """kind -> a folder holding a seeded random model and SmolLM2's tokenizer."""
    dirs = {}
    for kind in KINDS:
        model_class, config = _config(kind, tiny.tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = model_class(config)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        tiny.tokenizer.save_pretrained(path)
        dirs[kind] = str(path)
    return dirs


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def worker(model_dirs, kind):
    """An L1-only worker (L1 is its cache)."""
    worker = KVWorker(WorkerConfig(model=model_dirs[kind], codec="fp16", block_tokens=BLOCK))
    yield worker
    worker.close()


def sliding(layer) -> bool:
    return isinstance(layer, DynamicSlidingWindowLayer)


def prompt_of(worker: KVWorker, text: str) -> tuple[int, ...]:
    return tuple(worker.prompts.encode_input(PromptInput(prompt=text)))


def test_the_models_build_sliding_cache_layers(worker, kind):
    assert worker.engine.native_window == WINDOW
    layers = DynamicCache(config=worker.loaded.model.config).layers
    if kind == "mistral":
        assert all(type(layer) is DynamicSlidingWindowLayer for layer in layers)
    else:
        assert [type(layer) for layer in layers] == [DynamicSlidingWindowLayer, DynamicLayer] * 2
    assert all(layer.sliding_window == WINDOW for layer in layers if sliding(layer))


def test_the_window_changes_the_output(worker, kind, tiny):
    """Without this, the equality tests below could pass with the window silently ignored."""
    model_class, config = _config(kind, tiny.tokenizer)
    config.sliding_window = None
    if kind == "mixed":
        config.layer_types = ["full_attention"] * 4
    with torch.random.fork_rng():
        unbounded = model_class(config).eval()
    unbounded.load_state_dict(worker.loaded.model.state_dict())
    ids = torch.tensor([prompt_of(worker, "Unbounded? " + DOC)])  # [1, seq]
    assert ids.shape[1] > 2 * WINDOW
    with torch.inference_mode():
        windowed = worker.loaded.model(ids).logits[0, -1]
        full = unbounded(ids).logits[0, -1]
    assert not torch.allclose(windowed, full, atol=1e-3)


def test_blocks_cut_from_sliding_layers_rebuild_the_live_cache(worker, kind):
    model, config = worker.loaded.model, worker.loaded.model.config
    ids = list(prompt_of(worker, "Rebuild me. " + DOC))[: 5 * BLOCK]
    live = DynamicCache(config=config)
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(ids), BLOCK):  # each block is cut while it is at the tail
            block = torch.tensor([ids[start : start + BLOCK]])  # [1, BLOCK]
            model(input_ids=block, **{cache_keyword(model): live})
            blocks += recent_blocks(live, 1, BLOCK)
    rebuilt = blocks_to_cache(blocks, config)
    assert rebuilt.get_seq_length() == live.get_seq_length() == len(ids)  # positions go on at 80
    for mine, theirs in zip(rebuilt.layers, live.layers, strict=True):
        assert type(mine) is type(theirs)
        assert mine.keys.shape[2] == (KEPT if sliding(mine) else len(ids))
        assert torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)


def test_a_hit_past_the_window_matches_no_cache_and_hf_generate(worker):
    prompt = prompt_of(worker, "Shared prefix. " + DOC)
    params = SamplingParams(max_new_tokens=20)
    run(worker, WorkRequest(prompt, params))
    assert worker.flush(10)
    longer = prompt + prompt_of(worker, " And then it went on.")
    hit = run(worker, WorkRequest(longer, params))
    cold = run(worker, WorkRequest(longer, params, read_cache=False))
    assert hit.usage.cached_local_tokens == len(prompt) // BLOCK * BLOCK > 2 * WINDOW
    assert cold.usage.cached_tokens == 0
    ids = torch.tensor([longer])  # [1, seq]
    expected = worker.loaded.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
    )[0, ids.shape[1] :].tolist()
    assert list(hit.token_ids) == list(cold.token_ids) == expected
    assert len(set(expected)) > 8  # a varied output, not one token repeated


def test_sliding_layers_hold_only_the_window_while_generating(worker, kind, monkeypatch):
    live = []
    stream = worker.engine.stream

    def capture(*args, **kwargs):
        live.append(stream(*args, **kwargs))
        return live[-1]

    monkeypatch.setattr(worker.engine, "stream", capture)
    prompt = prompt_of(worker, "Long run. " + DOC[:60])
    held = []
    for item in worker.generate(WorkRequest(prompt, SamplingParams(max_new_tokens=90))):
        if isinstance(item, WorkDone):
            continue
        (generation,) = live
        fed = len(generation.fed_token_ids)
        assert generation.cache.get_seq_length() == fed
        for layer in generation.cache.layers:
            expected = min(fed, KEPT) if sliding(layer) else fed
            assert layer.keys.shape == (1, 2, expected, 16)
            assert layer.values.shape == (1, 2, expected, 16)
        held.append(fed)
    assert max(held) > 2 * WINDOW
    # Every full block of the sequence was cut from the tail in time, under the plain namespace.
    assert worker.flush(10)
    hashes = chain_hashes(worker.namespace(""), generation.fed_token_ids)
    assert len(worker.local.prefix(hashes)) == len(hashes) == max(held) // BLOCK


def test_a_second_worker_reuses_stored_blocks_and_resumes(model_dirs, kind, store):
    base = WorkerConfig(
        model=model_dirs[kind], codec="fp16", block_tokens=BLOCK, store_target=store.target
    )

    def make(name: str) -> KVWorker:
        return KVWorker(base, f"{kind}-{name}")  # one config: one deployment's secret

    a, b = make("a"), make("b")
    try:
        prompt = prompt_of(a, f"Across workers ({kind}). " + DOC)
        params = SamplingParams(max_new_tokens=28)
        whole = run(a, WorkRequest(prompt, params))
        assert a.flush(10)
        fed = [*prompt, *whole.token_ids][:-1]  # the last sampled token was never fed
        keys = [block_key(h) for h in chain_hashes(a.namespace(""), fed)]
        with StoreClient(store.target) as client:
            assert client.lookup(keys) == len(keys) == len(fed) // BLOCK

        shared = run(b, WorkRequest(prompt, params))
        assert shared.usage.cached_store_tokens == len(prompt) // BLOCK * BLOCK > 2 * WINDOW
        assert shared.token_ids == whole.token_ids

        resumed = run(b, WorkRequest(prompt, params, prior_output=whole.token_ids[:23]))
        assert resumed.usage.cached_tokens == (len(prompt) + 23 - 1) // BLOCK * BLOCK
        assert resumed.token_ids == whole.token_ids
    finally:
        a.close()
        b.close()


def test_prefill_stores_blocks_a_later_request_starts_from(model_dirs, kind):
    worker = KVWorker(WorkerConfig(model=model_dirs[kind], codec="fp16", block_tokens=BLOCK))
    try:
        prompt = prompt_of(worker, "Prefilled. " + DOC)
        params = SamplingParams(max_new_tokens=12)
        done = worker.prefill(prompt)
        assert done.stored_tokens == len(prompt) // BLOCK * BLOCK
        hit = run(worker, WorkRequest(prompt, params))
        assert hit.usage.cached_local_tokens == (len(prompt) - 1) // BLOCK * BLOCK
        assert hit.token_ids == run(worker, WorkRequest(prompt, params, read_cache=False)).token_ids
    finally:
        worker.close()


def test_block_tokens_must_fit_in_what_the_sliding_layers_keep(model_dirs, kind):
    for too_big in (WINDOW, 64):
        with pytest.raises(InvalidArgument, match=f"block_tokens must be at most {KEPT}"):
            KVWorker(WorkerConfig(model=model_dirs[kind], codec="fp16", block_tokens=too_big))
    largest = KVWorker(WorkerConfig(model=model_dirs[kind], codec="fp16", block_tokens=KEPT))
    try:
        prompt = tuple(range(100, 160))  # one block is cut in prefill, the next in decode
        first = run(largest, WorkRequest(prompt, SamplingParams(max_new_tokens=40)))
        assert largest.flush(10)
        fed = [*prompt, *first.token_ids][:-1]
        hashes = chain_hashes(largest.namespace(""), fed)
        assert len(largest.local.prefix(hashes)) == len(fed) // KEPT == 2
    finally:
        largest.close()


def test_a_windowed_request_is_refused_on_a_native_sliding_model(worker):
    request = WorkRequest(tuple(range(100, 150)), SamplingParams(max_new_tokens=4),
                          max_cache_tokens=256)  # fmt: skip
    with pytest.raises(
        InvalidArgument, match=rf"native sliding window \(config.sliding_window={WINDOW}\)"
    ):
        next(worker.generate(request))
