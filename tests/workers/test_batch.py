"""Continuous batching in one KVWorker (workers.batch): real tiny-random model, real KVStore.

The reference for every batched sequence is the engine's own solo loop (`Engine.generate`): a
sequence decoded in a batch, joining and leaving while others run, must give exactly its tokens.
"""

import threading
import time

import pytest
import torch
from transformers import DynamicCache

from tests.support.work import make_worker, run
from workers.api import (
    PrefillTimeout,
    PromptInput,
    SamplingParams,
    TokenEvent,
    WorkDone,
    WorkRequest,
)
from workers.batch_cache import GrowingLayer, PaddedBatch
from workers.engine import Decoding

TEXT = "Continuous batching lets many streams share one forward pass per step. " * 6


@pytest.fixture(scope="module")
def worker(store):
    w = make_worker(store, "batch", max_batch=4, max_batch_tokens=512)
    yield w
    w.close()


def prompt(worker, text: str) -> tuple[int, ...]:
    return tuple(worker.prompts.encode_input(PromptInput(prompt=text)))


def alone(worker, request: WorkRequest) -> list[int]:
    """The solo engine path's output tokens for `request` (no tiers, no batch)."""
    result = worker.engine.generate(
        request.token_ids, request.params, prior_output=request.prior_output
    )
    return result.token_ids


def start(worker, request: WorkRequest):
    """Start `request` and read its first token, so it is in the batch when this returns."""
    stream = worker.generate(request)
    first = next(stream)
    assert isinstance(first, TokenEvent)
    return first, stream


def finish(first, stream) -> WorkDone:
    items = [first, *stream]
    done = items[-1]
    assert isinstance(done, WorkDone)
    assert [i.token_id for i in items[:-1]] == list(done.token_ids)
    return done


def test_sequences_joining_and_leaving_match_their_solo_output(worker):
    # Different prompt lengths and output lengths, so rows join a running batch (longer and
    # shorter than it) and leave it while others go on; one starts from a stored prefix.
    stored = prompt(worker, "Stored prefix. " + TEXT)
    run(worker, WorkRequest(stored, SamplingParams(max_new_tokens=2)))
    assert worker.flush(10)
    requests = [
        WorkRequest(prompt(worker, "A. " + TEXT), SamplingParams(max_new_tokens=300)),
        WorkRequest(prompt(worker, "B short."), SamplingParams(max_new_tokens=40)),
        WorkRequest(stored + prompt(worker, " and more"), SamplingParams(max_new_tokens=120)),
        WorkRequest(prompt(worker, "D. " + TEXT + TEXT), SamplingParams(max_new_tokens=25)),
    ]
    expected = [alone(worker, r) for r in requests]
    before = worker.scheduler.stats.largest_batch
    started = [start(worker, r) for r in requests]  # each joins while the first still runs
    done = [finish(first, stream) for first, stream in started]
    assert [list(d.token_ids) for d in done] == expected
    assert done[2].usage.cached_tokens >= len(stored) - len(stored) % 16 - 16 > 0
    assert max(before, worker.scheduler.stats.largest_batch) >= 3
    # The one from the stored prefix wrote its new blocks, cut from its row of the batch.
    again = run(worker, requests[2])
    assert list(again.token_ids) == expected[2]


def test_a_cancelled_sequence_leaves_the_others_unchanged(worker):
    requests = [
        WorkRequest(prompt(worker, f"{i}. " + TEXT[: 40 * (i + 1)]),
                    SamplingParams(max_new_tokens=150), request_id=f"cancel-{i}")
        for i in range(3)
    ]  # fmt: skip
    expected = [alone(worker, r) for r in requests]
    started = [start(worker, r) for r in requests]
    worker.cancel("cancel-1")
    first, stream = started[1]
    cut_short = [first, *stream]  # ends without a WorkDone, before its 150 tokens
    assert not any(isinstance(i, WorkDone) for i in cut_short)
    assert len(cut_short) < 150
    assert [i.token_id for i in cut_short] == expected[1][: len(cut_short)]
    for i in (0, 2):
        assert list(finish(*started[i]).token_ids) == expected[i]


def test_a_failing_sequence_does_not_take_the_batch_down(worker, monkeypatch):
    # The middle one fails in its own sampling step, its sixth token.
    requests = [
        WorkRequest(prompt(worker, f"Fail {i}. " + TEXT),
                    SamplingParams(max_new_tokens=n, temperature=t, seed=3))
        for i, (n, t) in enumerate(((60, 0.0), (37, 0.8), (80, 0.0)))
    ]  # fmt: skip
    expected = [alone(worker, r) for r in requests]
    step = Decoding.step

    def failing(self, logits, greedy_token=None):
        if self.params.max_new_tokens == 37 and len(self.output) == 5:
            raise RuntimeError("injected sampling failure")
        return step(self, logits, greedy_token)

    monkeypatch.setattr(Decoding, "step", failing)
    started = [start(worker, r) for r in requests]
    _, stream = started[1]
    with pytest.raises(RuntimeError, match="injected"):
        list(stream)
    for i in (0, 2):
        assert list(finish(*started[i]).token_ids) == expected[i]


def test_stop_strings_and_seeded_sampling_in_a_batch_equal_alone(worker):
    sampled = SamplingParams(max_new_tokens=60, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    text = worker.engine.generate(prompt(worker, "Stop. " + TEXT), sampled).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    requests = [
        WorkRequest(prompt(worker, "Stop. " + TEXT),
                    SamplingParams(max_new_tokens=60, temperature=0.9, top_k=50, top_p=0.9,
                                   seed=7, stop=(stop,))),
        WorkRequest(prompt(worker, "Seeded. " + TEXT),
                    SamplingParams(max_new_tokens=50, temperature=1.1, seed=123)),
        WorkRequest(prompt(worker, "Greedy. " + TEXT), SamplingParams(max_new_tokens=70)),
    ]  # fmt: skip
    expected = [worker.engine.generate(r.token_ids, r.params) for r in requests]
    done = [finish(*s) for s in [start(worker, r) for r in requests]]
    for got, want in zip(done, expected, strict=True):
        assert (list(got.token_ids), got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason,
        )  # fmt: skip
    assert done[0].finish_reason == "stop" and stop not in done[0].text


def test_a_resumed_stream_in_a_batch_continues_as_alone(worker):
    request = WorkRequest(prompt(worker, "Resume. " + TEXT), SamplingParams(max_new_tokens=60))
    whole = alone(worker, request)
    other = start(worker, WorkRequest(prompt(worker, "Other."), SamplingParams(max_new_tokens=90)))
    resumed = run(worker, WorkRequest(request.token_ids, request.params,
                                      prior_output=tuple(whole[:25])))  # fmt: skip
    finish(*other)
    assert list(resumed.token_ids) == whole


def test_max_batch_and_max_batch_tokens_bound_every_step(store):
    w = make_worker(store, "bounds", max_batch=2, max_batch_tokens=24)
    shapes: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(module, args, kwargs):
        with lock:
            shapes.append(tuple(kwargs["input_ids"].shape))

    hook = w.engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        requests = [
            WorkRequest(prompt(w, f"Bound {i}. " + TEXT[:200]), SamplingParams(max_new_tokens=30))
            for i in range(5)
        ]
        expected = [alone(w, r) for r in requests]
        shapes.clear()
        lone_before = w.scheduler.stats.lone_prefills
        threads, results = [], [None] * len(requests)

        def go(i):
            results[i] = run(w, requests[i])

        for i in range(len(requests)):
            threads.append(threading.Thread(target=go, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join(120)
        assert [list(r.token_ids) for r in results] == expected
    finally:
        hook.remove()
        w.close()
    assert shapes and max(rows for rows, _ in shapes) <= 2  # decode steps: one row each
    # Every pass stays within the token bound, but a lone newcomer's prefill with nobody
    # decoding: that one runs in one pass (there is no stream to keep flowing).
    beyond = [(rows, cols) for rows, cols in shapes if rows * cols > 24]
    assert all(rows == 1 for rows, _ in beyond)
    assert len(beyond) <= w.scheduler.stats.lone_prefills - lone_before
    assert any(rows == 2 for rows, _ in shapes)  # and it did batch
    assert w.scheduler.stats.largest_step_tokens <= 24
    assert w.scheduler.stats.largest_batch == 2


def test_a_windowed_request_works_while_others_are_batched(worker):
    windowed = WorkRequest(prompt(worker, "Window. " + TEXT * 2), SamplingParams(max_new_tokens=40),
                           max_cache_tokens=68, sink_tokens=4)  # fmt: skip
    expected = run(worker, windowed)
    assert expected.usage.evicted_tokens > 0
    others = [
        WorkRequest(prompt(worker, f"Beside {i}. " + TEXT), SamplingParams(max_new_tokens=80))
        for i in range(2)
    ]
    want = [alone(worker, r) for r in others]
    started = [start(worker, r) for r in others]
    got = run(worker, windowed)
    assert list(got.token_ids) == list(expected.token_ids)
    assert [list(finish(*s).token_ids) for s in started] == want


def test_padded_batch_rows_read_back_their_own_tokens():
    def cache(length: int, fill: float) -> DynamicCache:
        c = DynamicCache()
        for layer in range(2):
            k = torch.full((1, 3, length, 4), fill + layer)
            c.update(k, -k, layer)
        return c

    batch = PaddedBatch()
    assert batch.join(cache(5, 1.0)) == 0
    assert batch.join(cache(2, 10.0)) == 1  # shorter: padded to the batch
    assert batch.join(cache(7, 20.0)) == 2  # longer: the batch is padded to it
    assert (batch.rows, batch.columns, batch.lengths) == (3, 7, [5, 2, 7])
    assert batch.mask.tolist()[1] == [0, 0, 0, 0, 0, 1, 1]
    keys, values = batch.row(1)[1]
    assert keys.shape == (1, 3, 2, 4) and bool((keys == 11.0).all()) and bool((values == -11).all())
    inputs = batch.step_inputs([1, 2, 3])
    assert inputs["position_ids"].tolist() == [[5], [2], [7]]
    assert inputs["attention_mask"].shape == (3, 8)
    batch.keep([0, 1])  # the longest leaves: two padding columns go in every row
    assert (batch.columns, batch.lengths, batch.pad(1)) == (5, [5, 2], 3)
    assert bool((batch.row(0)[0][0] == 1.0).all())
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None


def test_a_growing_layer_appends_in_place_and_keeps_every_column():
    layer = GrowingLayer.holding(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2))
    buffer = layer._keys
    for step in range(1, 200):  # past the first buffer's room: it grows, contents kept
        column = torch.full((2, 1, 1, 2), float(step))
        keys, values = layer.update(column, -column)
        assert keys.shape == (2, 1, 3 + step, 2) and layer.get_seq_length() == 3 + step
        if step == 10:
            assert layer._keys is buffer  # no copy while there is room
    assert keys[:, :, 3:, 0].flatten().tolist() == [float(s) for s in range(1, 200)] * 2
    assert bool((values[:, :, :3] == 0).all())


def test_a_prefill_deadline_and_a_cancel_stop_a_chunked_prefill_between_chunks(store):
    w = make_worker(store, "deadline", max_batch=4, max_batch_tokens=20)
    try:
        long_prompt = prompt(w, "Deadline. " + TEXT * 3)
        assert len(long_prompt) > 100  # at least five chunks of at most 20 tokens
        other = WorkRequest(prompt(w, "Unhurried."), SamplingParams(max_new_tokens=60))
        want = alone(w, other)
        running = start(w, other)
        late = WorkRequest(long_prompt, SamplingParams(max_new_tokens=4), prefill_timeout_s=1e-6)
        with pytest.raises(PrefillTimeout, match="--prefill-timeout"):
            list(w.generate(late))
        # A cancel that lands while the prefill is under way ends the stream with no tokens.
        w.cancel("gone")
        gone = WorkRequest(long_prompt, SamplingParams(max_new_tokens=4), request_id="gone")
        assert list(w.generate(gone)) == []
        assert list(finish(*running).token_ids) == want
        # With a stream running beside it, the same prompt goes in chunks of at most 20 tokens
        # (alone, it would take one pass: nothing to keep flowing).
        running = start(w, other)
        chunks_before = w.scheduler.stats.prefill_chunks
        ok = run(w, WorkRequest(long_prompt, SamplingParams(max_new_tokens=4)))
        assert w.scheduler.stats.prefill_chunks - chunks_before >= len(long_prompt) // 20
        assert list(finish(*running).token_ids) == want
        assert list(ok.token_ids) == alone(
            w, WorkRequest(long_prompt, SamplingParams(max_new_tokens=4))
        )
    finally:
        w.close()


def test_a_request_returns_only_once_its_prompt_blocks_are_queued(worker, monkeypatch):
    # The prompt's blocks are cut after its first token; with one token that is also its last,
    # and a caller that flushes once the request returned must find them queued (bench ttft
    # flushes, then asks another worker for them). A slow queue makes the order visible.
    submit = worker.writer.submit
    queued: list[int] = []

    def slow(batch):
        time.sleep(0.3)
        queued.append(len(batch))
        return submit(batch)

    monkeypatch.setattr(worker.writer, "submit", slow)
    ids = prompt(worker, "One token. " + TEXT)
    done = run(worker, WorkRequest(ids, SamplingParams(max_new_tokens=1), read_cache=False))
    assert len(done.token_ids) == 1
    assert sum(queued) == len(ids) // 16  # every full block, before the request ended
