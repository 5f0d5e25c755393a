"""Prefill and decode with a real KV cache, streaming tokens as they are made.

The engine is pure torch + transformers: no I/O, no store, no Ray. The worker hands it a
`DynamicCache` already holding a prefix of the sequence (rebuilt from stored blocks) and the
engine prefills only the rest. `Generation.cache` stays live while it runs, so the worker can cut
completed blocks out of it for the store without the engine knowing.

Sampling is reproducible per position: the random draw for output token i depends only on
(seed, i). A generation resumed on another worker from its first k tokens therefore continues
exactly as the original would have, sampled or greedy.
"""

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from kvpool.errors import InvalidArgument
from workers.api import SamplingParams, TokenEvent
from workers.detokenizer import OutputText
from workers.kv.bounds import CacheWindow, check_context, feed_chunks
from workers.models import LoadedModel, cache_keyword
from workers.window import Rerotator, evict, native_window


@dataclass(slots=True)
class GenerationUsage:
    """What one generation cost; the worker turns it into `WorkUsage`."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    evicted_tokens: int = 0  # tokens of the sequence no longer in a windowed cache


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: GenerationUsage


@dataclass(slots=True)
class Generation:
    """A running generation: iterate it for `TokenEvent`s; `result` is set once it ends."""

    cache: DynamicCache | None  # None in no-cache mode
    fed_token_ids: list[int]  # tokens fed to the model so far, in order (all, evicted included)
    window: CacheWindow | None = None  # bounds the cache (workers.window)
    evicted: int = 0  # tokens of fed_token_ids no longer in `cache`
    # Feed the model in chunks ending on multiples of this (None: the whole prefill at once),
    # calling `on_forward` after each, so blocks can be cut before they leave the cache.
    chunk_tokens: int | None = None
    on_forward: Callable[["Generation"], None] | None = field(default=None, repr=False)
    _events: Iterator[TokenEvent] = field(repr=False, default=iter(()))
    result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def run(self) -> GenerationResult:
        """Drain the generation and return its result."""
        for _ in self._events:
            pass
        if self.result is None:  # pragma: no cover - _events always sets it before finishing
            raise RuntimeError("generation ended without a result")
        return self.result


@dataclass(frozen=True, slots=True)
class Feed:
    """How a generation starts and is fed: its past and its chunks (see `Engine.stream`)."""

    past: DynamicCache | None = None
    past_tokens: int | None = None
    prior_output: Sequence[int] = ()
    use_cache: bool = True
    started: float | None = None
    window: CacheWindow | None = None
    chunk_tokens: int | None = None
    on_forward: Callable[[Generation], None] | None = None


class Engine:
    """Generates text from a loaded model, with or without a KV cache."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = int(self.model.config.vocab_size)
        self._rerotator: Rerotator | None = None  # built on the first windowed request
        # The model's own sliding window, when some of its layers attend only to recent tokens.
        self.native_window = native_window(self.model.config)
        self._cache_arg = cache_keyword(self.model)

    def forward(self, cache: DynamicCache, **inputs: Any) -> Any:
        """One forward pass continuing `cache`, keeping only the last position's logits.

        The one place that names the model's cache argument (workers.models.cache_keyword).
        logits_to_keep=1: the LM head over a 49k vocabulary for every prompt position would cost
        more than the rest of a short prefill.
        """
        return self.model(use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}, **inputs)

    def rerotator(self) -> Rerotator:
        """Re-rotates cached keys; InvalidArgument for a model that cannot be windowed."""
        if self._rerotator is None:
            self._rerotator = Rerotator(self.model)
        return self._rerotator

    def check_fits(
        self, prompt_tokens: int, params: SamplingParams, window: CacheWindow | None = None
    ) -> None:
        """Raise unless the prompt plus `max_new_tokens` fits the model's context.

        A windowed cache never holds more than `window.max_cache_tokens` positions, so then only
        the window has to fit, however long the sequence grows.
        """
        check_context(prompt_tokens, params.max_new_tokens, self.loaded.max_context, window)
        if window is not None:
            self.rerotator()  # refuses models whose keys cannot be re-rotated

    # --- generation ------------------------------------------------------------------------

    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        past: DynamicCache | None = None,
        past_tokens: int | None = None,
        prior_output: Sequence[int] = (),
        use_cache: bool = True,
        started: float | None = None,
        window: CacheWindow | None = None,
        chunk_tokens: int | None = None,
        on_forward: Callable[[Generation], None] | None = None,
    ) -> Generation:
        """Start generating after `prompt_ids` (+ `prior_output`, tokens already generated).

        `past` holds K and V for a prefix of prompt + prior_output; only the rest is prefilled.
        At least the last token is always recomputed, since its logits pick the next token.
        `started` (a `time.perf_counter()` value) lets a caller include its own work, such as
        fetching cached blocks, in `ttft_ms`.

        With a `window`, the cache is bounded (workers.window): `past` is then a windowed cache
        rebuilt at a block boundary, `past_tokens` the number of tokens it stands for (they
        cannot be cropped back: evicted tokens are gone), and the sequence is fed in chunks that
        end on block boundaries. `chunk_tokens` asks for chunked feeding without a window (for a
        model's native sliding window); `on_forward` runs after every chunk.
        """
        feed = Feed(past, past_tokens, prior_output, use_cache, started, window, chunk_tokens,
                    on_forward)  # fmt: skip
        generation, decoding = self._prepare(prompt_ids, params, feed)
        generation._events = self._decode_loop(generation, decoding)
        return generation

    def _prepare(
        self, prompt_ids: Sequence[int], params: SamplingParams, feed: "Feed"
    ) -> tuple[Generation, "Decoding"]:
        past, window = feed.past, feed.window
        prompt_ids, prior_output = list(prompt_ids), list(feed.prior_output)
        if not prompt_ids:
            raise InvalidArgument("prompt is empty; give at least one token")
        if len(prior_output) >= params.max_new_tokens:
            raise InvalidArgument(
                f"prior_output has {len(prior_output)} tokens, not below "
                f"max_new_tokens={params.max_new_tokens}"
            )
        self.check_fits(len(prompt_ids), params, window)
        sequence = prompt_ids + prior_output
        cached, chunk_tokens = 0, feed.chunk_tokens
        if window is not None:
            if not feed.use_cache:
                raise InvalidArgument("a windowed cache needs use_cache; the window is the cache")
            chunk_tokens = window.block_tokens
            cache = past if past is not None else DynamicCache(config=self.model.config)
            cached = feed.past_tokens if feed.past_tokens is not None else cache.get_seq_length()
            if cached % window.block_tokens or not 0 <= cached < len(sequence):
                raise InvalidArgument(
                    f"a windowed past must stand for a whole number of blocks before the last "
                    f"token; got {cached} tokens of a {len(sequence)}-token sequence"
                )
        elif feed.use_cache:
            cache = past if past is not None else DynamicCache(config=self.model.config)
            cached = min(cache.get_seq_length(), len(sequence) - 1)
            if cache.get_seq_length() > cached:
                # transformers 5 takes the number of tokens to drop, as a negative count.
                cache.crop(cached - cache.get_seq_length())
        else:
            cache = None
        return self._begin(prompt_ids, prior_output, params, cache, cached, feed, chunk_tokens)

    def begin(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        past: DynamicCache | None = None,
        prior_output: Sequence[int] = (),
        started: float | None = None,
    ) -> tuple[Generation, "Decoding"]:
        """Set up a generation that someone else steps (workers.batch): no window, with a cache.

        Returns the generation (its cache holds `past`, cropped to leave the last token to
        compute) and its `Decoding`, which turns each next-token logits into a `TokenEvent`.
        The caller feeds `generation.cache` the tokens after `fed_token_ids`, then one token per
        step, and calls `decoding.step` with the logits after each.
        """
        return self._prepare(
            prompt_ids, params, Feed(past=past, prior_output=prior_output, started=started)
        )

    def _begin(
        self,
        prompt_ids: list[int],
        prior_output: list[int],
        params: SamplingParams,
        cache: DynamicCache | None,
        cached: int,
        feed: "Feed",
        chunk_tokens: int | None,
    ) -> tuple[Generation, "Decoding"]:
        window, sequence = feed.window, prompt_ids + prior_output
        params = params.seeded()  # a sampled request without a seed gets one, for its positions
        generation = Generation(
            cache=cache,
            fed_token_ids=sequence[:cached],
            window=window,
            chunk_tokens=chunk_tokens,
            on_forward=feed.on_forward,
        )
        if window is not None and cache is not None:
            generation.evicted = cached - cache.get_seq_length()
            if cached:  # a past of plain blocks may still owe the eviction at its boundary
                generation.evicted += evict(cache, window, self.rerotator())
        usage = GenerationUsage(prompt_tokens=len(prompt_ids), cached_tokens=cached)
        decoding = Decoding(
            self, generation, sequence, len(prompt_ids), params, usage, feed.started
        )
        return generation, decoding

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, **kwargs
    ) -> GenerationResult:
        """Run a whole generation; see `stream` for the arguments."""
        return self.stream(prompt_ids, params, **kwargs).run()

    @torch.inference_mode()
    def _decode_loop(self, generation: Generation, decoding: "Decoding") -> Iterator[TokenEvent]:
        # Prefill: everything not already in the cache, in one forward pass.
        sequence = decoding.sequence
        logits = self._forward(generation, sequence[len(generation.fed_token_ids) :], sequence)
        while True:
            event = decoding.step(logits)
            yield event
            if decoding.done:
                break
            logits = self._forward(generation, [event.token_id], decoding.full())
        decoding.finish()

    def _forward(self, generation: Generation, new_ids: list[int], full: list[int]) -> torch.Tensor:
        """Logits for the next token after feeding `new_ids` (cached) or `full` (no cache)."""
        if generation.cache is None:
            input_ids = torch.tensor([full], device=self.device)  # [1, seq]
            out = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        elif generation.chunk_tokens is not None:
            return self._forward_chunks(generation, new_ids)
        else:
            input_ids = torch.tensor([new_ids], device=self.device)  # [1, new]
            out = self.forward(generation.cache, input_ids=input_ids)
            generation.fed_token_ids.extend(new_ids)
        return out.logits[0, -1].float()  # [vocab]

    def _forward_chunks(self, generation: Generation, new_ids: list[int]) -> torch.Tensor:
        """Feed `new_ids` in chunks ending on multiples of `chunk_tokens`, evicting at each end."""
        assert generation.cache is not None and generation.chunk_tokens is not None
        start = len(generation.fed_token_ids)
        logits = None
        for a, b in feed_chunks(start, start + len(new_ids), generation.chunk_tokens):
            input_ids = torch.tensor([new_ids[a - start : b - start]], device=self.device)
            out = self.forward(generation.cache, input_ids=input_ids)
            logits = out.logits[0, -1]
            generation.fed_token_ids.extend(new_ids[a - start : b - start])
            if generation.on_forward is not None:
                generation.on_forward(generation)  # cuts completed blocks before any eviction
            window = generation.window
            if window is not None and b % window.block_tokens == 0:
                generation.evicted += evict(generation.cache, window, self.rerotator())
        assert logits is not None, "no tokens to feed"
        return logits.float()

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class Decoding:
    """One sequence's token picking past its prefill: sampling, stop strings, text and usage.

    `step` takes the logits for the next token and returns its `TokenEvent`; once `done`,
    `finish` sets `generation.result`. The engine's own loop and the batch scheduler
    (workers.batch) both drive it, so a sequence decodes the same either way.
    """

    __slots__ = (
        "_engine", "_first_token_at", "_out", "_resumed", "_started", "generation", "output",
        "params", "prompt_len", "sequence", "usage",
    )  # fmt: skip

    def __init__(
        self,
        engine: Engine,
        generation: Generation,
        sequence: list[int],
        prompt_len: int,
        params: SamplingParams,
        usage: GenerationUsage,
        started: float | None,
    ) -> None:
        self._engine, self.generation, self.sequence = engine, generation, sequence
        self.prompt_len, self.params, self.usage = prompt_len, params, usage
        self._started = started or time.perf_counter()
        self.output = sequence[prompt_len:]  # starts with prior_output on a resumed generation
        self._resumed = len(self.output)
        self._out = OutputText(engine.decode_text, params, engine.eos_token_ids, self.output)
        self._first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self._out.done

    @property
    def finish_reason(self) -> str:
        return self._out.finish_reason

    def full(self) -> list[int]:
        """The whole sequence so far: prompt, prior output and what this generation made."""
        return self.sequence + self.output[self._resumed :]

    def step(self, logits: torch.Tensor | None, token: int | None = None) -> TokenEvent:
        """Pick the next token from `logits` [vocab] and return its event.

        `token` is the greedy pick when the caller already made it (workers.batch takes every
        greedy row's argmax at once: one device sync per step rather than one per row).
        """
        if token is None or not self.params.greedy:
            assert logits is not None, "logits are needed to sample"
            token = sample(logits, self.params, len(self.output))
        now = time.perf_counter()
        if self._first_token_at is None:
            self._first_token_at = now
            self.usage.ttft_ms = (now - self._started) * 1000.0
        return self._out.add(token)  # appends to self.output

    def finish(self) -> GenerationResult:
        """Set and return the generation's result (after the last `step`)."""
        generated = len(self.output) - self._resumed
        elapsed = time.perf_counter() - (self._first_token_at or self._started)
        usage = self.usage
        usage.completion_tokens = len(self.output)
        usage.evicted_tokens = self.generation.evicted
        usage.tokens_per_s = (generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0
        result = GenerationResult(
            text=self._out.text, token_ids=self.output, finish_reason=self.finish_reason,
            usage=usage,
        )  # fmt: skip
        self.generation.result = result
        return result


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Pick the token at output `position` from `logits` [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [vocab]
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    generator = torch.Generator(device="cpu").manual_seed(_position_seed(params.seed, position))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _position_seed(seed: int | None, position: int) -> int:
    """A seed for output position `position` that depends only on (seed, position)."""
    base = 0 if seed is None else seed
    return (base * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (2**63)
