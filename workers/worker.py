"""One inference worker: a model, its engine, L1, the store client and the write-behind queue.

`KVWorker` is plain Python (no Ray): `workers.actor` wraps it as a Ray actor, and tests drive it
directly. Per request it hashes the prompt's full blocks, takes the longest cached prefix (L1,
then the store), rebuilds a DynamicCache from it, and lets the engine prefill only the rest. As
the sequence grows, every newly completed block (prompt or output) is cut from the live cache and
handed to the write-behind thread, so decode never waits on the store.
"""

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from kvpool.errors import InvalidArgument
from workers.engine import Engine, Generation, SamplingParams, TokenEvent
from workers.inputs import PromptInput, encode_input
from workers.kv.block import decode_block, encode_block
from workers.kv.hashing import BlockHash, Namespace, block_key, chain_hashes, tenant_salt
from workers.kv.layout import blocks_to_cache, cache_to_blocks, recent_blocks
from workers.models import load_model
from workers.prefix import CachedPrefix, find_blocks, find_prefix
from workers.tiers import BlockStore, LocalBlocks, LocalStats, WriteBehind, WriteStats
from workers.window import DEFAULT_SINK_TOKENS, CacheWindow, rebuild, requested_window

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: str = "smollm2-135m"
    device: str | None = None  # None: CUDA when the worker's process sees a GPU, else CPU
    codec: str = "int8"
    block_tokens: int = 64
    store_target: str | None = None  # HOST:PORT of the KVStore; None runs with L1 only
    store_timeout_s: float = 5.0
    store_auth_token: str | None = field(default=None, repr=False)  # bearer token for the store
    store_tls_ca: bytes | None = field(default=None, repr=False)  # PEM CA: reach the store by TLS
    # Keys the tenant salt (workers.kv.hashing.tenant_salt); the store never sees it. None: the
    # tenant's plain name, which anyone can compute keys from.
    namespace_secret: bytes | None = field(default=None, repr=False)
    l1_bytes: int = 1 << 30
    write_queue_blocks: int = 512
    block_ttl_s: int | None = None  # None: the store's default
    retain_freed_memory: bool = True  # in the actor process; see workers.actor.retain_freed_memory

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.l1_bytes < 0:
            raise ValueError(f"l1_bytes must be >= 0, got {self.l1_bytes}")
        if self.write_queue_blocks < 1:
            raise ValueError(f"write_queue_blocks must be >= 1, got {self.write_queue_blocks}")


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """What the gateway asks a worker to generate."""

    token_ids: tuple[int, ...]  # the whole prompt (a session's history included)
    params: SamplingParams
    tenant: str = ""
    prior_output: tuple[int, ...] = ()  # tokens already streamed before a failover
    read_cache: bool = True  # False computes from scratch (a baseline for tests and benches)
    request_id: str = ""  # names the request for `cancel`
    max_cache_tokens: int = 0  # > 0 bounds the cache with sinks + a recent window (workers.window)
    sink_tokens: int = DEFAULT_SINK_TOKENS


@dataclass(frozen=True, slots=True)
class WorkUsage:
    prompt_tokens: int
    cached_local_tokens: int
    cached_store_tokens: int
    completion_tokens: int  # prior_output included
    ttft_ms: float  # worker receipt to first token, the cache fetch included
    tokens_per_s: float
    worker: str
    evicted_tokens: int = 0  # tokens of the sequence evicted from a windowed cache

    @property
    def cached_tokens(self) -> int:
        return self.cached_local_tokens + self.cached_store_tokens


@dataclass(frozen=True, slots=True)
class WorkDone:
    """The last item of a worker's stream."""

    finish_reason: str  # "stop" | "length" | "eos"
    token_ids: tuple[int, ...]  # the whole output, prior_output included
    text: str
    usage: WorkUsage


@dataclass(frozen=True, slots=True)
class PrefillResult:
    prompt_tokens: int
    stored_tokens: int  # full blocks of the prompt now in the store (or L1 without a store)
    cached_tokens: int  # of those, tokens that were cached before the call
    worker: str


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    model: str
    fingerprint: str
    codec: str
    block_tokens: int
    max_context: int
    eos_token_ids: frozenset[int]
    device: str


@dataclass(frozen=True, slots=True)
class WorkerStats:
    worker_id: str
    requests: int
    in_flight: int
    cached_local_tokens: int
    cached_store_tokens: int
    computed_tokens: int  # prompt tokens prefilled because no tier had them
    corrupt_blocks: int
    store_errors: int
    local: LocalStats
    writes: WriteStats


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    in_flight: int = 0
    cached_local_tokens: int = 0
    cached_store_tokens: int = 0
    computed_tokens: int = 0
    corrupt_blocks: int = 0
    store_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class KVWorker:
    def __init__(self, config: WorkerConfig, worker_id: str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.loaded = load_model(config.model, device=config.device)
        self.engine = Engine(self.loaded)
        native = self.engine.native_window
        if native is not None and config.block_tokens >= native:
            # A sliding layer keeps only its last `native - 1` tokens, and each block is cut from
            # that tail as it completes; checked here, as mid-stream the output has already begun.
            raise InvalidArgument(
                f"block_tokens={config.block_tokens} does not fit the model's sliding window of "
                f"{native} tokens: its sliding layers keep the last {native - 1} tokens, so "
                f"block_tokens must be at most {native - 1}"
            )
        self.store: BlockStore | None = None
        if config.store_target:
            from services.auth import channel_credentials  # the gRPC edge, only when used
            from services.store.client import StoreClient

            self.store = StoreClient(
                config.store_target,
                timeout_s=config.store_timeout_s,
                auth_token=config.store_auth_token,
                credentials=channel_credentials(config.store_tls_ca),
            )
        self.local = LocalBlocks(config.l1_bytes)
        self.writer = WriteBehind(
            self._encode, self._decode, self.local, self.store,
            max_pending_blocks=config.write_queue_blocks, ttl_s=config.block_ttl_s,
        )  # fmt: skip
        self._counters = _Counters()
        self._cancelled: dict[str, None] = {}  # insertion-ordered, bounded
        self._cancel_lock = threading.Lock()

    # --- what the gateway asks ---------------------------------------------------------------

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.loaded.name,
            fingerprint=self.loaded.fingerprint,
            codec=self.config.codec,
            block_tokens=self.config.block_tokens,
            max_context=self.loaded.max_context,
            eos_token_ids=self.loaded.eos_token_ids,
            device=str(self.loaded.device),
        )

    def encode(self, given: PromptInput, history: Sequence[int] = ()) -> list[int]:
        return encode_input(self.engine, given, history)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def namespace(self, tenant: str) -> Namespace:
        return Namespace(
            model_fingerprint=self.loaded.fingerprint,
            codec=self.config.codec,
            block_tokens=self.config.block_tokens,
            tenant=tenant_salt(tenant, self.config.namespace_secret),
        )

    def window(self, request: WorkRequest) -> CacheWindow | None:
        """The request's cache bound, or None; InvalidArgument when it cannot apply."""
        # `generate` then checks, with the engine, that the model can be windowed.
        return requested_window(
            request.max_cache_tokens, request.sink_tokens, self.config.block_tokens
        )

    def generate(self, request: WorkRequest) -> Iterator[TokenEvent | WorkDone]:
        """Stream the output's tokens, then one WorkDone."""
        started = time.perf_counter()
        window = self.window(request)
        self.engine.check_fits(len(request.token_ids), request.params, window)
        sequence = [*request.token_ids, *request.prior_output]
        chain = _BlockChain(self.namespace(request.tenant), window)
        hashes = chain.hashes(sequence)
        start = self._start(hashes, window, len(sequence)) if request.read_cache else _Start()
        chunked = window is not None or self.engine.native_window is not None
        cutter = _Cutter(self, chain, start.tokens // self.config.block_tokens)
        generation = self.engine.stream(
            request.token_ids, request.params, past=start.past,
            past_tokens=start.tokens if window is not None else None,
            prior_output=request.prior_output, started=started, window=window,
            chunk_tokens=self.config.block_tokens if chunked else None,
            on_forward=cutter if chunked else None,
        )  # fmt: skip
        self._count(in_flight=1, requests=1)
        try:
            for event in generation:
                yield event  # first, so that cutting blocks never delays a token
                cutter(generation)
                if self._take_cancel(request.request_id):
                    return
            cutter(generation)
        finally:
            self._count(in_flight=-1)
        result = generation.result
        if result is None:  # pragma: no cover - the engine sets it before its iterator ends
            raise RuntimeError("generation ended without a result")
        cached = result.usage.cached_tokens  # the engine may recompute the last cached token
        local = min(cached, start.local_tokens)
        self._count(
            cached_local_tokens=local,
            cached_store_tokens=cached - local,
            computed_tokens=max(0, len(sequence) - cached),
        )
        yield WorkDone(
            finish_reason=result.finish_reason,
            token_ids=tuple(result.token_ids),
            text=result.text,
            usage=WorkUsage(
                prompt_tokens=result.usage.prompt_tokens,
                cached_local_tokens=local,
                cached_store_tokens=cached - local,
                completion_tokens=result.usage.completion_tokens,
                ttft_ms=result.usage.ttft_ms,
                tokens_per_s=result.usage.tokens_per_s,
                worker=self.worker_id,
                evicted_tokens=result.usage.evicted_tokens,
            ),
        )

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        """Compute and store the full blocks of `token_ids`; returns once they are stored."""
        chain = _BlockChain(self.namespace(tenant), None)
        hashes = chain.hashes(token_ids)
        start = self._start(hashes, None, len(token_ids))
        chunked = self.engine.native_window is not None
        cutter = _Cutter(self, chain, start.tokens // self.config.block_tokens)
        generation = self.engine.stream(
            token_ids, SamplingParams(max_new_tokens=1), past=start.past,
            chunk_tokens=self.config.block_tokens if chunked else None,
            on_forward=cutter if chunked else None,
        )  # fmt: skip
        generation.run()  # the one sampled token is discarded; its prompt's KV is what we want
        cutter(generation)
        self.writer.flush()
        block_tokens = self.config.block_tokens
        if self.store is not None:
            # Blocks that were only in L1 (from an earlier request) may be missing in the store.
            present = self._store_prefix_blocks(hashes)
        else:
            present = len(self.local.prefix(hashes))
        return PrefillResult(
            prompt_tokens=len(token_ids),
            stored_tokens=present * block_tokens,
            cached_tokens=start.tokens,
            worker=self.worker_id,
        )

    def cancel(self, request_id: str) -> None:
        """Stop the generation `request_id` after its current token (its client went away)."""
        if request_id:
            with self._cancel_lock:
                self._cancelled[request_id] = None
                # A cancel can arrive after its request ended; keep only the newest ones.
                while len(self._cancelled) > 1024:
                    del self._cancelled[next(iter(self._cancelled))]

    def _take_cancel(self, request_id: str) -> bool:
        if not request_id:
            return False
        with self._cancel_lock:
            return self._cancelled.pop(request_id, False) is None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every block cut so far is written (tests; shutdown)."""
        return self.writer.flush(timeout_s)

    def stats(self) -> WorkerStats:
        c = self._counters
        with c.lock:
            return WorkerStats(
                worker_id=self.worker_id,
                requests=c.requests,
                in_flight=c.in_flight,
                cached_local_tokens=c.cached_local_tokens,
                cached_store_tokens=c.cached_store_tokens,
                computed_tokens=c.computed_tokens,
                corrupt_blocks=c.corrupt_blocks,
                store_errors=c.store_errors,
                local=self.local.stats(),
                writes=self.writer.stats(),
            )

    def close(self) -> None:
        self.writer.close()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    # --- internals ---------------------------------------------------------------------------

    def _encode(self, block: torch.Tensor, block_hash: BlockHash) -> bytes:
        return encode_block(block, self.config.codec, block_hash)

    def _decode(self, data: bytes, block_hash: BlockHash) -> torch.Tensor:
        # [layers, 2, kv_heads, block_tokens, head_dim] on the model's device: on a GPU the
        # quantized sections cross the bus and are dequantized there, a quarter of the bytes.
        return decode_block(
            data,
            expected_hash=block_hash,
            geometry=self.loaded.geometry,
            block_tokens=self.config.block_tokens,
            device=self.loaded.device,
        )

    def _cached_prefix(self, hashes: Sequence[BlockHash]) -> CachedPrefix:
        prefix = find_prefix(hashes, self.local, self.store, self._decode)
        if prefix.corrupt_blocks or prefix.store_error:
            self._count(corrupt_blocks=prefix.corrupt_blocks, store_errors=int(prefix.store_error))
        return prefix

    def _start(self, hashes: list[BlockHash], window: CacheWindow | None, length: int) -> "_Start":
        """Where to start a sequence of `length` tokens: the cache rebuilt from stored blocks.

        Plain caches start after the longest cached prefix. A model with a native sliding
        window, or a windowed request, starts on a block boundary before the last token, since
        its cache cannot be cropped back. A windowed request needs only the sink blocks and the
        recent window's blocks at the latest such boundary; when one of those is missing, it
        falls back to the plain prefix before the first eviction and recomputes the rest.
        """
        block_tokens = self.config.block_tokens
        usable = len(hashes)
        if window is not None or self.engine.native_window is not None:
            usable = min(usable, (length - 1) // block_tokens)
        if window is not None:
            boundary = self._window_boundary(hashes[:usable], window)
            if boundary:
                needed = window.blocks_for_state(boundary)
                found = find_blocks({i: hashes[i] for i in needed}, self.local, self.store,
                                    self._decode)  # fmt: skip
                if found.corrupt_blocks or found.store_error:
                    self._count(corrupt_blocks=found.corrupt_blocks,
                                store_errors=int(found.store_error))  # fmt: skip
                if len(found.blocks) == len(needed):
                    past = rebuild(found.blocks, boundary, window, self.engine.rerotator(),
                                   self.loaded.model.config)  # fmt: skip
                    tokens = boundary * block_tokens
                    local = tokens if found.local_blocks == len(needed) else 0
                    return _Start(past, tokens, local)
            usable = min(usable, window.plain_blocks)  # the blocks before the first eviction
        prefix = self._cached_prefix(hashes[:usable])
        if not prefix.blocks:
            return _Start()
        past = blocks_to_cache(prefix.blocks, self.loaded.model.config)
        tokens = len(prefix.blocks) * block_tokens
        return _Start(past, tokens, prefix.local_blocks * block_tokens)

    def _window_boundary(self, hashes: list[BlockHash], window: CacheWindow) -> int:
        """The latest block boundary after the first eviction whose window is cached, or 0.

        The latest boundary is tried first, then earlier ones, as far back as a window's worth of
        blocks: a session's next turn usually finds every block of its previous turn, but not the
        one block that its new input completes. Only hashes are looked up here; blocks are
        fetched once the boundary is chosen.
        """
        latest = len(hashes)
        span = 2 * (window.max_cache_tokens // window.block_tokens) + 2
        earliest = max(latest - span, window.plain_blocks)
        if earliest > latest:
            return 0
        # The recent blocks of every candidate boundary start at or after `low`.
        low = window.first_recent_block(earliest)
        run = hashes[low:latest]
        present = 0
        for block_hash in run:  # the leading run held in L1
            if block_hash not in self.local:
                break
            present += 1
        if present < len(run) and self.store is not None:
            try:
                present = max(present, self.store.lookup([block_key(h) for h in run]))
            except Exception as exc:
                log.warning("store lookup failed, treating as a miss: %s", exc)
                self._count(store_errors=1)
        boundary = low + present
        return boundary if boundary >= earliest else 0

    def _store_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        try:
            return self.store.lookup([block_key(h) for h in hashes]) if self.store else 0
        except Exception as exc:
            log.warning("store lookup after prefill failed: %s", exc)
            self._count(store_errors=1)
            return 0

    def _cut(self, generation: Generation, chain: "_BlockChain", written: int) -> int:
        """Hand blocks completed since block `written` to the writer; returns the new count."""
        if generation.cache is None:
            return written
        block_tokens = self.config.block_tokens
        fed = generation.fed_token_ids
        full = len(fed) // block_tokens
        if full <= written:
            return written
        hashes = chain.hashes(fed)
        # Fresh tensors (both functions copy), so the growing cache cannot change them.
        if generation.chunk_tokens is None:
            blocks = cache_to_blocks(generation.cache, block_tokens, first_block=written)
        else:  # a windowed or sliding cache: the new blocks are at its tail
            blocks = recent_blocks(generation.cache, full - written, block_tokens,
                                   after=len(fed) - full * block_tokens)  # fmt: skip
        self.writer.submit(list(zip(hashes[written:full], blocks[: full - written], strict=True)))
        return full

    def _count(self, **deltas: int) -> None:
        c = self._counters
        with c.lock:
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)


@dataclass(frozen=True, slots=True)
class _Start:
    """A cache to continue from, the tokens it stands for, and how many came from L1."""

    past: DynamicCache | None = None
    tokens: int = 0
    local_tokens: int = 0


class _BlockChain:
    """The hashes of a growing sequence's full blocks.

    Under a window, a block computed after the first eviction depends on the window, so it is
    keyed in a namespace that names the window; the blocks before stay in the plain namespace,
    shared with every request on that prefix (workers.window).
    """

    def __init__(self, namespace: Namespace, window: CacheWindow | None) -> None:
        self.window = window
        self._namespaces = [namespace]
        if window is not None:
            self._namespaces.append(
                replace(namespace, window=(window.max_cache_tokens, window.sink_tokens))
            )
        self._chains: list[list[BlockHash]] = [[] for _ in self._namespaces]
        self._block_tokens = namespace.block_tokens

    def hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        size = self._block_tokens
        full = len(tokens) // size
        for namespace, chain in zip(self._namespaces, self._chains, strict=True):
            if full > len(chain):
                parent = chain[-1] if chain else None
                fresh = tokens[len(chain) * size : full * size]
                chain.extend(chain_hashes(namespace, fresh, parent))
        plain = self._chains[0][:full]
        if self.window is None:
            return plain
        windowed = self._chains[1]
        return [windowed[i] if self.window.windowed_block(i) else plain[i] for i in range(full)]


class _Cutter:
    """Cuts a generation's completed blocks for the writer; called after every chunk and token."""

    def __init__(self, worker: KVWorker, chain: _BlockChain, written: int) -> None:
        self._worker, self._chain, self.written = worker, chain, written

    def __call__(self, generation: Generation) -> None:
        self.written = self._worker._cut(generation, self._chain, self.written)
