"""Continuous batching: one thread runs the model's forward passes for every batched sequence.

A request's own thread finds its start (tiers, fetch plan) as before, then submits a
`BatchSequence` here and yields events from the sequence's bounded queue. The scheduler's
thread loops over steps:

1. drop cancelled sequences; check waiting ones (cancel, prefill deadline);
2. admit waiting sequences while fewer than `max_batch` are prefilling or decoding;
3. prefill: newcomers, oldest first, each alone on its own batch-1 cache, in chunks taking the
   step's token budget left after the decoders (`max_batch_tokens - decoding`); a lone newcomer
   with nobody decoding prefills in one pass (chunks would only slow it down); a newcomer whose
   prefill completes samples its first token, then has its prompt's blocks cut, and joins the
   padded batch (workers.batch_cache);
4. decode: ONE forward pass over every decoding sequence (one token each), then per sequence:
   sample with the engine's own `Decoding` (per-position seeds, stop strings, usage), emit the
   event, cut completed blocks for the write-behind queue, and leave when done.

An exception while handling one sequence (its sampling, its block cut, its prefill) fails that
sequence only: the error is put in its queue and re-raised in its request's thread. Only a
failing batched forward pass fails every sequence in it, since it cannot be pinned on one.

Why not transformers' continuous-batching manager (`generate_batch`, paged cache): its
`add_request` takes token ids only, so a sequence cannot start from K and V rebuilt from our
stored blocks, and its sampling has no per-position seeds (docs/architecture.md).
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from kvpool.errors import Unavailable
from workers.api import TokenEvent
from workers.batch_cache import PaddedBatch
from workers.chain import Cutter
from workers.engine import Decoding, Engine, Generation

log = logging.getLogger(__name__)

_END = object()  # the queue's last item once a sequence is done


@dataclass(eq=False, slots=True)
class BatchSequence:
    """One request in the scheduler: iterate it (in the request's thread) for its events."""

    generation: Generation  # its cache is the sequence's own until it joins the batch
    decoding: Decoding
    cutter: Cutter
    # Called while the sequence waits and before each prefill chunk: raises to end it (a cancel,
    # a prefill deadline); the exception reaches the request's thread.
    check: Callable[[], None]
    events: "queue.Queue[object]" = field(init=False)
    prefill_s: float = 0.0  # seconds of the sequence's own prefill forward passes
    cancelled: bool = False

    def __post_init__(self) -> None:
        # Bounded: a sequence emits at most max_new_tokens events, then one end or error item.
        self.events = queue.Queue(maxsize=self.decoding.params.max_new_tokens + 1)

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (the caller stopped reading)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self.events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, TokenEvent)
            yield item

    def _put(self, item: object) -> None:
        self.events.put_nowait(item)


@dataclass(slots=True)
class BatchStats:
    steps: int = 0  # decode forward passes over the batch
    decoded_tokens: int = 0  # tokens those passes produced
    prefill_chunks: int = 0
    largest_batch: int = 0
    largest_step_tokens: int = 0  # prefill chunks plus decoders in one bounded step
    lone_prefills: int = 0  # steps where one newcomer, with nobody decoding, prefilled unbounded


class BatchScheduler:
    """Owns the forward passes of batched sequences; see the module's docstring."""

    def __init__(self, engine: Engine, max_batch: int, max_batch_tokens: int) -> None:
        if max_batch < 1 or max_batch_tokens <= max_batch:
            raise ValueError(
                f"max_batch must be >= 1 and max_batch_tokens above it (a step's decoders take "
                f"one token each, prefill the rest), got {max_batch} and {max_batch_tokens}"
            )
        self.engine = engine
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._waiting: deque[BatchSequence] = deque()
        self._prefilling: list[BatchSequence] = []
        self._joining: list[BatchSequence] = []  # prefilled, to join at the next step
        self._rows: list[BatchSequence] = []  # row i of self._batch
        self._batch = PaddedBatch()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, sequence: BatchSequence) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the worker is closing; it takes no new requests")
            self._waiting.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvpool-batch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def occupancy(self) -> tuple[int, int]:
        """(sequences prefilling or decoding, sequences waiting to be admitted)."""
        with self._cond:
            return self._running(), len(self._waiting)

    def _running(self) -> int:
        return len(self._prefilling) + len(self._joining) + len(self._rows)

    def close(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # --- the scheduler's thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running()):
                    self._cond.wait()
                if self._closed:
                    gone = [*self._waiting, *self._prefilling, *self._joining, *self._rows]
                    self._waiting.clear()
                    self._prefilling, self._joining, self._rows = [], [], []
                    self._batch.keep([])
                    for sequence in gone:
                        sequence._put(Unavailable("the worker closed during the request"))
                    return
                self._admit()
            try:
                self._step()
            except BaseException as exc:  # pragma: no cover - _step contains its own failures
                log.exception("batch step failed; failing its sequences")
                self._fail_all(exc)

    def _admit(self) -> None:
        """Under the lock: check waiting sequences, then admit them while there is room."""
        for sequence in list(self._waiting):
            if sequence.cancelled or not self._checked(sequence):
                self._waiting.remove(sequence)
                if sequence.cancelled:
                    sequence._put(_END)
        while self._waiting and self._running() < self.max_batch:
            self._prefilling.append(self._waiting.popleft())

    def _checked(self, sequence: BatchSequence) -> bool:
        """Run the sequence's check; False (and the error in its queue) when it raised."""
        try:
            sequence.check()
        except BaseException as exc:
            sequence._put(exc)
            return False
        return True

    @torch.inference_mode()
    def _step(self) -> None:
        for sequence in self._joining:  # prefilled last step: they decode from this one on
            assert sequence.generation.cache is not None
            self._batch.join(sequence.generation.cache)
            sequence.generation.cache = None  # its tensors belong to the batch now
        with self._cond:
            self._rows.extend(self._joining)
            self._joining = []
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._rows))
        self._leave([i for i, s in enumerate(self._rows) if s.cancelled], cancelled=True)
        decoders = len(self._rows)
        budget = self.max_batch_tokens - decoders
        lone = not decoders and len(self._prefilling) == 1
        if lone:
            # No stream to keep flowing: the lone newcomer prefills in one pass, as it would
            # alone. Chunks only cost it time (on an H200, 256-token chunks made a 16k-token
            # Llama-3-8B-shaped miss 12x slower).
            budget = len(self._prefilling[0].decoding.sequence)
            self.stats.lone_prefills += 1
        step_tokens = budget
        for sequence in list(self._prefilling):
            if budget <= 0:
                break
            budget -= self._prefill(sequence, budget)
        stats = self.stats
        if not lone:
            stats.largest_step_tokens = max(stats.largest_step_tokens, step_tokens - budget)
        if decoders:
            self._decode()

    def _prefill(self, sequence: BatchSequence, budget: int) -> int:
        """Feed the sequence's next chunk of at most `budget` tokens; returns the tokens fed."""
        generation, decoding = sequence.generation, sequence.decoding
        fed = len(generation.fed_token_ids)
        chunk = decoding.sequence[fed : fed + budget]
        try:
            if sequence.cancelled:
                raise _Gone
            sequence.check()
            began = time.perf_counter()
            assert generation.cache is not None  # a batched sequence always has one
            out = self.engine.forward(
                generation.cache, input_ids=torch.tensor([chunk], device=self.engine.device)
            )  # [1, chunk] in
            generation.fed_token_ids.extend(chunk)
            sequence.prefill_s += time.perf_counter() - began
            self.stats.prefill_chunks += 1
            if len(generation.fed_token_ids) < len(decoding.sequence):
                return len(chunk)
            self._remove_prefilling(sequence)
            # The prompt's blocks are cut once its first token is out, so cutting (and the
            # write-behind encoding it wakes) never delays that token, and before the sequence
            # can end, so a request that returns has its blocks queued (a flush then sees them).
            if not self._emit(
                sequence, out.logits[0, -1].float(), then=lambda: sequence.cutter(generation)
            ):
                return len(chunk)
            with self._cond:
                self._joining.append(sequence)
        except _Gone:
            self._remove_prefilling(sequence)
            sequence._put(_END)
        except BaseException as exc:
            self._remove_prefilling(sequence)
            sequence._put(exc)
        return len(chunk)

    def _remove_prefilling(self, sequence: BatchSequence) -> None:
        with self._cond:
            if sequence in self._prefilling:
                self._prefilling.remove(sequence)

    def _emit(
        self,
        sequence: BatchSequence,
        logits: torch.Tensor,
        greedy: int | None = None,
        then: Callable[[], None] | None = None,
    ) -> bool:
        """Sample and queue the sequence's next token; False once it is done (or failed).

        `then` runs after the token is queued and before the sequence's end is: work that must
        not delay the token, but must be done before its request can finish.
        """
        decoding = sequence.decoding
        try:
            event = decoding.step(logits, greedy)
            if decoding.done:
                decoding.finish()
            sequence._put(event)
            if then is not None:
                then()
        except BaseException as exc:
            sequence._put(exc)
            return False
        if decoding.done:
            sequence._put(_END)
            return False
        return True

    def _decode(self) -> None:
        """One forward pass over every batched row, then each row's token."""
        batch = self._batch
        tokens = [s.decoding.output[-1] for s in self._rows]
        inputs = batch.step_inputs(tokens)
        try:
            out = self.engine.forward(batch.cache, **inputs)
        except BaseException as exc:  # not one sequence's fault: the whole batch fails
            log.exception("batched forward pass failed for %d sequences", len(self._rows))
            self._fail_all(exc)
            return
        batch.stepped(inputs["attention_mask"])
        self.stats.steps += 1
        self.stats.decoded_tokens += len(tokens)
        logits = out.logits[:, -1].float()  # [rows, vocab]
        # Every row's greedy pick in one go: one device sync per step, not one per row.
        greedy = logits.argmax(dim=-1).tolist()
        leaving = []
        for row, (sequence, token) in enumerate(zip(self._rows, tokens, strict=True)):
            generation = sequence.generation
            generation.fed_token_ids.append(token)
            try:
                if sequence.cutter.due(len(generation.fed_token_ids)):
                    sequence.cutter.cut_row(batch.row(row), generation.fed_token_ids)
            except BaseException as exc:
                sequence._put(exc)
                leaving.append(row)
                continue
            if sequence.cancelled:
                sequence._put(_END)
                leaving.append(row)
            elif not self._emit(sequence, logits[row], greedy[row]):
                leaving.append(row)
        self._leave(leaving)

    def _leave(self, rows: list[int], cancelled: bool = False) -> None:
        if not rows:
            return
        if cancelled:
            for row in rows:
                self._rows[row]._put(_END)
        gone = set(rows)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._batch.keep(keep)
        with self._cond:
            self._rows = [self._rows[i] for i in keep]

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            failed = [*self._prefilling, *self._joining, *self._rows]
            self._prefilling, self._joining, self._rows = [], [], []
        self._batch.keep([])
        for sequence in failed:
            sequence._put(exc)


class _Gone(Exception):
    """A sequence cancelled before its prefill chunk."""
