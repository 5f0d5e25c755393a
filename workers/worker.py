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
from transformers import DynamicCache

from kvpool.errors import InvalidArgument
from workers.api import (
    PLAN_KINDS,
    PLAN_MODES,
    NodeTierStats,
    PrefillResult,
    PrefillTimeout,
    SamplingParams,
    TokenEvent,
    WorkDone,
    WorkerConfig,
    WorkerInfo,
    WorkerStats,
    WorkRequest,
    WorkUsage,
)
from workers.chain import BlockChain, Cutter
from workers.engine import Engine, Generation
from workers.fetch import Fetched, fetch_run, locate, split_prefix
from workers.kv.block import decode_block, encode_block, encoded_bytes_per_token
from workers.kv.bounds import CacheWindow, requested_window
from workers.kv.hashing import BlockHash, Namespace, block_key, tenant_salt
from workers.kv.layout import blocks_to_cache
from workers.models import load_model
from workers.node_tier import NodeTier
from workers.plan import CachedRun, Estimates, choose
from workers.prefix import CachedPrefix, find_blocks, find_prefix
from workers.prompt import PromptEncoder, tokenizer_files
from workers.tiers import BlockStore, LocalBlocks, WriteBatch, WriteBehind
from workers.window import rebuild

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Counters:
    requests: int = 0
    in_flight: int = 0
    cached_local_tokens: int = 0
    cached_node_tokens: int = 0
    cached_store_tokens: int = 0
    recomputed_tokens: int = 0
    plan_none: int = 0
    plan_fetch: int = 0
    plan_recompute: int = 0
    plan_split: int = 0
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
        self.prompts = PromptEncoder.for_model(self.loaded)
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
        self.node = NodeTier.for_this_node(config.store_timeout_s) if config.node_tier else None
        self.estimates = Estimates(self.loaded.device.type)
        # What one block weighs in a tier: its payload plus about 256 bytes of header.
        self._block_bytes = 256 + int(
            encoded_bytes_per_token(config.codec, self.loaded.geometry, config.block_tokens)
            * config.block_tokens
        )
        self.local = LocalBlocks(config.l1_bytes)
        self.writer = WriteBehind(
            self._encode, self._decode, self.local, self.store,
            max_pending_blocks=config.write_queue_blocks, ttl_s=config.block_ttl_s,
            node=self.node,
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
            vocab_size=self.prompts.vocab_size,
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer's files, for the gateway to tokenize exactly as this worker would."""
        return tokenizer_files(self.loaded.tokenizer)

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
        chain = BlockChain(self.namespace(request.tenant), window)
        hashes = chain.hashes(sequence)
        if request.fetch_plan and request.fetch_plan not in PLAN_MODES:
            raise InvalidArgument(
                f"fetch_plan must be one of {', '.join(PLAN_MODES)} (or empty for the worker's "
                f"own), got {request.fetch_plan!r}"
            )
        start = (
            self._start(hashes, window, len(sequence), sequence, request.fetch_plan)
            if request.read_cache
            else _Start()
        )
        chunked = window is not None or self.engine.native_window is not None
        cutter = Cutter(chain, start.tokens // self.config.block_tokens, self.writer.submit)
        prefilling = True
        deadline = started + request.prefill_timeout_s if request.prefill_timeout_s else None

        def on_forward(generation: Generation) -> None:
            cutter(generation)
            if prefilling:  # a long chunked prefill stops early when it is no longer wanted
                self._check_prefill(request, started, deadline)

        generation = self.engine.stream(
            request.token_ids, request.params, past=start.past,
            past_tokens=start.tokens if window is not None else None,
            prior_output=request.prior_output, started=started, window=window,
            chunk_tokens=self.config.block_tokens if chunked else None,
            on_forward=on_forward if chunked else None,
        )  # fmt: skip
        self._count(in_flight=1, requests=1)
        prefill_started = time.perf_counter()
        first = True
        try:
            for event in generation:
                prefilling = False
                if first:  # the engine's prefill of what no tier gave, and the first token
                    first = False
                    self.estimates.observe_prefill(
                        len(sequence) - start.tokens,
                        len(sequence),
                        time.perf_counter() - prefill_started,
                    )
                yield event  # first, so that cutting blocks never delays a token
                cutter(generation)
                if self._take_cancel(request.request_id):
                    return
            cutter(generation)
        except _Cancelled:
            return
        finally:
            self._count(in_flight=-1)
        result = generation.result
        if result is None:  # pragma: no cover - the engine sets it before its iterator ends
            raise RuntimeError("generation ended without a result")
        # The engine may recompute the last cached token; a split's recomputed blocks are in
        # its past but came from no tier.
        in_past = start.recomputed_tokens if start.plan == "split" else 0
        cached = max(0, result.usage.cached_tokens - in_past)
        local = min(cached, start.local_tokens)
        node = min(cached - local, start.node_tokens)
        self._count(
            cached_local_tokens=local,
            cached_node_tokens=node,
            cached_store_tokens=cached - local - node,
            computed_tokens=max(0, len(sequence) - cached),
            recomputed_tokens=start.recomputed_tokens,
            **{f"plan_{start.plan}": 1},
        )
        yield WorkDone(
            finish_reason=result.finish_reason,
            token_ids=tuple(result.token_ids),
            text=result.text,
            usage=WorkUsage(
                prompt_tokens=result.usage.prompt_tokens,
                cached_local_tokens=local,
                cached_store_tokens=cached - local - node,
                completion_tokens=result.usage.completion_tokens,
                ttft_ms=result.usage.ttft_ms,
                tokens_per_s=result.usage.tokens_per_s,
                worker=self.worker_id,
                evicted_tokens=result.usage.evicted_tokens,
                cached_node_tokens=node,
                plan=start.plan,
                recomputed_tokens=start.recomputed_tokens,
            ),
        )

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        """Compute and store the full blocks of `token_ids`; returns once they are stored."""
        chain = BlockChain(self.namespace(tenant), None)
        hashes = chain.hashes(token_ids)
        start = self._start(hashes, None, len(token_ids))
        chunked = self.engine.native_window is not None
        # This call's own blocks, written here once computed: waiting on the shared write-behind
        # queue would also wait for every other request's blocks.
        batches: list[WriteBatch] = []
        cutter = Cutter(chain, start.tokens // self.config.block_tokens, batches.append)
        generation = self.engine.stream(
            token_ids, SamplingParams(max_new_tokens=1), past=start.past,
            chunk_tokens=self.config.block_tokens if chunked else None,
            on_forward=cutter if chunked else None,
        )  # fmt: skip
        generation.run()  # the one sampled token is discarded; its prompt's KV is what we want
        cutter(generation)
        for batch in batches:
            self.writer.write(batch)
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

    def _check_prefill(self, request: WorkRequest, started: float, deadline: float | None) -> None:
        """Between prefill chunks: stop a request that was cancelled or ran past its deadline."""
        if self._take_cancel(request.request_id):
            raise _Cancelled
        if deadline is not None and time.perf_counter() > deadline:
            raise PrefillTimeout(
                f"prefill of {len(request.token_ids)} tokens took longer than the gateway's "
                f"--prefill-timeout={request.prefill_timeout_s:g} s; send a shorter prompt"
            )

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
                cached_node_tokens=c.cached_node_tokens,
                recomputed_tokens=c.recomputed_tokens,
                plans={kind: getattr(c, f"plan_{kind}") for kind in PLAN_KINDS},
                node=self._node_stats(),
                estimates=self.estimates.snapshot(),
            )

    def _node_stats(self) -> NodeTierStats | None:
        if self.node is None:
            return None
        try:
            return self.node.stats()
        except Exception as exc:  # the tier's actor is gone: stats must still answer
            log.warning("node tier stats failed: %s", exc)
            return None

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
        prefix = find_prefix(hashes, self.local, self.store, self._decode, self.node,
                             self.estimates)  # fmt: skip
        if prefix.corrupt_blocks or prefix.store_error:
            self._count(corrupt_blocks=prefix.corrupt_blocks, store_errors=int(prefix.store_error))
        return prefix

    def _start(
        self,
        hashes: list[BlockHash],
        window: CacheWindow | None,
        length: int,
        sequence: Sequence[int] | None = None,
        plan_mode: str = "",
    ) -> "_Start":
        """Where to start a sequence of `length` tokens: the cache rebuilt from stored blocks.

        A plain cache (no window, no native sliding window) whose `sequence` is given follows
        the fetch plan (workers.plan): fetch the cached prefix, recompute it, or both at once.

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
                                    self._decode, self.node)  # fmt: skip
                if found.corrupt_blocks or found.store_error:
                    self._count(corrupt_blocks=found.corrupt_blocks,
                                store_errors=int(found.store_error))  # fmt: skip
                if len(found.blocks) == len(needed):
                    past = rebuild(found.blocks, boundary, window, self.engine.rerotator(),
                                   self.loaded.model.config)  # fmt: skip
                    tokens = boundary * block_tokens
                    local = tokens if found.local_blocks == len(needed) else 0
                    return _Start(past, tokens, local, plan="fetch")
            usable = min(usable, window.plain_blocks)  # the blocks before the first eviction
        if window is None and self.engine.native_window is None and sequence is not None:
            return self._planned_start(
                hashes[:usable], sequence, plan_mode or self.config.fetch_plan
            )
        prefix = self._cached_prefix(hashes[:usable])
        if not prefix.blocks:
            return _Start()
        past = blocks_to_cache(prefix.blocks, self.loaded.model.config)
        tokens = len(prefix.blocks) * block_tokens
        return _Start(
            past, tokens, prefix.local_blocks * block_tokens, prefix.node_blocks * block_tokens,
            plan="fetch" if prefix.node_blocks + prefix.store_blocks else "none",
        )  # fmt: skip

    def _planned_start(
        self, hashes: list[BlockHash], sequence: Sequence[int], mode: str
    ) -> "_Start":
        """The cache per the fetch plan chosen for this prompt (workers.plan)."""
        size = self.config.block_tokens
        found = locate(hashes, self.local, self.node, self.store, self.estimates)
        run = CachedRun(
            block_tokens=size,
            prompt_tokens=len(sequence),
            local_blocks=len(found.local),
            node_blocks=len(found.node_refs),
            store_blocks=found.store_blocks,
            block_bytes=self._block_bytes,
        )
        plan = choose(run, self.estimates, mode)
        log.debug(
            "fetch plan %s: %d tokens, cached blocks L1 %d node %d store %d, split at %d, "
            "predicted %s", plan.kind, len(sequence), run.local_blocks, run.node_blocks,
            run.store_blocks, plan.split_block,
            {k: round(v * 1000, 1) for k, v in plan.predicted_s.items()},
        )  # fmt: skip
        local = len(found.local)

        def fetch(first: int) -> Fetched:
            return fetch_run(found, hashes, first, self.node, self.store, self._decode,
                             self.local, self.estimates)  # fmt: skip

        config = self.loaded.model.config
        fetched = Fetched([])
        recomputed = 0
        if plan.kind == "split":
            split = plan.split_block
            past, fetched, _ = split_prefix(
                self.loaded.model, found.local, sequence[local * size : split * size],
                lambda: fetch(split),
            )  # fmt: skip
            recomputed = (split - local) * size
            tokens = (split + len(fetched.blocks)) * size
        else:
            if plan.kind == "fetch":
                fetched = fetch(local)
            elif plan.kind == "recompute":
                recomputed = (run.cached_blocks - local) * size
            blocks = found.local + fetched.blocks
            past = blocks_to_cache(blocks, config) if blocks else None
            tokens = len(blocks) * size
        if fetched.corrupt_blocks or fetched.store_error or found.store_error:
            self._count(corrupt_blocks=fetched.corrupt_blocks,
                        store_errors=int(fetched.store_error or found.store_error))  # fmt: skip
        return _Start(
            past, tokens, local * size, fetched.node_blocks * size, plan=plan.kind,
            recomputed_tokens=recomputed,
        )  # fmt: skip

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

    def _count(self, **deltas: int) -> None:
        c = self._counters
        with c.lock:
            for name, delta in deltas.items():
                setattr(c, name, getattr(c, name) + delta)


class _Cancelled(Exception):
    """Raised between prefill chunks of a request whose caller cancelled it."""


@dataclass(frozen=True, slots=True)
class _Start:
    """A cache to continue from, the tokens it stands for, and how many came from L1."""

    past: DynamicCache | None = None
    tokens: int = 0
    local_tokens: int = 0
    node_tokens: int = 0
    plan: str = "none"
    recomputed_tokens: int = 0  # in `past` (a split) or left to the engine (recompute)
