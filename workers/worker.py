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
from dataclasses import dataclass, field

import torch

from workers.engine import Engine, Generation, SamplingParams, TokenEvent
from workers.inputs import PromptInput, encode_input
from workers.kv.block import decode_block, encode_block
from workers.kv.hashing import BlockHash, Namespace, chain_hashes
from workers.kv.layout import blocks_to_cache, cache_to_blocks
from workers.models import load_model
from workers.prefix import CachedPrefix, find_prefix
from workers.tiers import BlockStore, LocalBlocks, LocalStats, WriteBehind, WriteStats

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


@dataclass(frozen=True, slots=True)
class WorkUsage:
    prompt_tokens: int
    cached_local_tokens: int
    cached_store_tokens: int
    completion_tokens: int  # prior_output included
    ttft_ms: float  # worker receipt to first token, the cache fetch included
    tokens_per_s: float
    worker: str

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
            tenant=tenant,
        )

    def generate(self, request: WorkRequest) -> Iterator[TokenEvent | WorkDone]:
        """Stream the output's tokens, then one WorkDone."""
        started = time.perf_counter()
        self.engine.check_fits(len(request.token_ids), request.params)
        namespace = self.namespace(request.tenant)
        sequence = [*request.token_ids, *request.prior_output]
        hashes = chain_hashes(namespace, sequence)
        prefix = self._cached_prefix(hashes) if request.read_cache else CachedPrefix((), 0, 0)
        past = self._past(prefix)
        generation = self.engine.stream(
            request.token_ids, request.params, past=past,
            prior_output=request.prior_output, started=started,
        )  # fmt: skip
        self._count(in_flight=1, requests=1)
        try:
            written = len(prefix.blocks)
            for event in generation:
                yield event  # first, so that cutting blocks never delays a token
                written = self._write_behind(generation, namespace, hashes, written)
                if self._take_cancel(request.request_id):
                    return
            self._write_behind(generation, namespace, hashes, written)
        finally:
            self._count(in_flight=-1)
        result = generation.result
        if result is None:  # pragma: no cover - the engine sets it before its iterator ends
            raise RuntimeError("generation ended without a result")
        cached = result.usage.cached_tokens  # the engine may recompute the last cached token
        local = min(cached, prefix.local_blocks * self.config.block_tokens)
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
            ),
        )

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        """Compute and store the full blocks of `token_ids`; returns once they are stored."""
        namespace = self.namespace(tenant)
        hashes = chain_hashes(namespace, token_ids)
        prefix = self._cached_prefix(hashes)
        generation = self.engine.stream(
            token_ids, SamplingParams(max_new_tokens=1), past=self._past(prefix)
        )
        generation.run()  # the one sampled token is discarded; its prompt's KV is what we want
        self._write_behind(generation, namespace, hashes, len(prefix.blocks))
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
            cached_tokens=len(prefix.blocks) * block_tokens,
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

    def _past(self, prefix: CachedPrefix):  # -> DynamicCache | None
        if not prefix.blocks:
            return None
        return blocks_to_cache(prefix.blocks, self.loaded.model.config)

    def _store_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        from workers.kv.hashing import block_key

        try:
            return self.store.lookup([block_key(h) for h in hashes]) if self.store else 0
        except Exception as exc:
            log.warning("store lookup after prefill failed: %s", exc)
            self._count(store_errors=1)
            return 0

    def _write_behind(
        self,
        generation: Generation,
        namespace: Namespace,
        hashes: list[BlockHash],
        written: int,
    ) -> int:
        """Hand blocks completed since block `written` to the writer; returns the new count.

        `hashes` (the chain so far) is extended in place as the output completes blocks.
        """
        if generation.cache is None:
            return written
        block_tokens = self.config.block_tokens
        fed = generation.fed_token_ids
        full = len(fed) // block_tokens
        if full <= written:
            return written
        if full > len(hashes):
            parent = hashes[-1] if hashes else None
            hashes.extend(
                chain_hashes(
                    namespace, fed[len(hashes) * block_tokens : full * block_tokens], parent
                )
            )
        # Fresh tensors (cache_to_blocks copies), so the growing cache cannot change them.
        blocks = cache_to_blocks(generation.cache, block_tokens, first_block=written)[
            : full - written
        ]
        self.writer.submit(list(zip(hashes[written:full], blocks, strict=True)))
        return full

    def _count(self, **deltas: int) -> None:
        c = self._counters
        with c.lock:
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)
