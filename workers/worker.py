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
from collections.abc import Callable, Iterator, Sequence

import torch

from kvpool.errors import InvalidArgument
from workers.api import (
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
from workers.batch import BatchScheduler, BatchSequence
from workers.chain import BlockChain, Cutter
from workers.counters import RequestCounters
from workers.engine import Engine, Generation
from workers.fetch import Tiers
from workers.hit import PrefixHit
from workers.kv.block import decode_block, encode_block, encoded_bytes_per_token
from workers.kv.bounds import CacheWindow, requested_window
from workers.kv.hashing import BlockHash, Namespace, block_key, tenant_salt
from workers.kv.staging import PinnedRing
from workers.models import load_model
from workers.node_tier import NodeTier
from workers.plan import Estimates
from workers.prompt import PromptEncoder, tokenizer_files
from workers.start import HitPath, Start, Starts
from workers.tiers import BlockStore, LocalBlocks, WriteBatch, WriteBehind

log = logging.getLogger(__name__)


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
        # Block payloads bound for a GPU go through pinned memory allocated once (kv.staging).
        self.staging = PinnedRing() if self.loaded.device.type == "cuda" else None
        # What one block weighs in a tier: its payload plus about 256 bytes of header.
        block_bytes = 256 + int(
            encoded_bytes_per_token(config.codec, self.loaded.geometry, config.block_tokens)
            * config.block_tokens
        )
        self.local = LocalBlocks(config.l1_bytes)
        self.writer = WriteBehind(
            self._encode, self.decode_stored, self.local, self.store,
            max_pending_blocks=config.write_queue_blocks, ttl_s=config.block_ttl_s,
            node=self.node,
        )  # fmt: skip
        self.counters = RequestCounters()
        self._block_bytes = block_bytes
        self.use_estimates(self.estimates)
        # One thread runs every batched sequence's forward passes (workers.batch).
        self.scheduler = BatchScheduler(self.engine, config.max_batch, config.max_batch_tokens)
        self._cancelled: dict[str, None] = {}  # insertion-ordered, bounded
        self._cancel_lock = threading.Lock()

    def use_estimates(self, estimates: Estimates) -> None:
        """Plan with `estimates` from now on (tests pin the plan's inputs this way)."""
        self.estimates = estimates
        tiers = Tiers(self.local, self.node, self.store, estimates)
        self.starts = Starts(
            HitPath(tiers, self.engine, self.config, self.decode_stored, self.writer,
                    self.counters.count, self._block_bytes, self.staging)
        )  # fmt: skip

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
        window = self.window(request)  # the engine checks it fits the model, once (`begin`)
        sequence = [*request.token_ids, *request.prior_output]
        full = len(request.token_ids) // self.config.block_tokens
        if len(request.block_hashes) > full:
            raise InvalidArgument(
                f"block_hashes has {len(request.block_hashes)} hashes; the prompt has {full} full "
                f"blocks of {self.config.block_tokens} tokens"
            )
        chain = BlockChain(self.namespace(request.tenant), window, request.block_hashes)
        hashes = chain.hashes(sequence)
        start = (
            self.starts.find(hashes, sequence, window, request.fetch_plan)
            if request.read_cache
            else Start(None, PrefixHit(self.config.block_tokens))
        )
        hit = start.hit
        submit = self._submitter(hashes[: hit.stored_blocks])
        cutter = Cutter(chain, hit.tokens // self.config.block_tokens, submit)
        deadline = started + request.prefill_timeout_s if request.prefill_timeout_s else None

        def check() -> None:
            self._check_prefill(request, started, deadline)

        if window is not None or self.engine.native_window is not None:
            sequenced: _Solo | BatchSequence = self._solo(
                request, started, start, window, cutter, check
            )
        else:  # the batch scheduler's (workers.batch)
            generation, decoding = self.engine.begin(
                request.token_ids, request.params, past=start.past,
                prior_output=request.prior_output, started=started,
            )  # fmt: skip
            sequenced = BatchSequence(generation, decoding, cutter, check)
            self.scheduler.submit(sequenced)
        self.counters.count(in_flight=1, requests=1)
        try:
            for index, event in enumerate(sequenced):
                if index == 0:  # the engine's prefill of what no tier gave, and the first token
                    self.estimates.observe_prefill(
                        len(sequence) - hit.tokens, len(sequence), sequenced.prefill_s
                    )
                yield event
                if self._take_cancel(request.request_id):
                    return
        except _Cancelled:
            return
        finally:
            sequenced.cancel()  # a no-op once it ended; else it leaves at the next step
            self.counters.count(in_flight=-1)
        yield self._done(sequenced.generation, len(sequence), hit)

    def _solo(
        self,
        request: WorkRequest,
        started: float,
        start: Start,
        window: CacheWindow | None,
        cutter: Cutter,
        check: Callable[[], None],
    ) -> "_Solo":
        """A bounded cache or a native sliding window: decoded alone, prefilled in chunks."""
        solo = _Solo(cutter)

        def on_forward(generation: Generation) -> None:
            cutter(generation)
            if solo.prefilling:  # a long chunked prefill stops early when it is not wanted
                check()

        solo.generation = self.engine.stream(
            request.token_ids, request.params, past=start.past,
            past_tokens=start.hit.tokens if window is not None else None,
            prior_output=request.prior_output, started=started, window=window,
            chunk_tokens=self.config.block_tokens, on_forward=on_forward,
        )  # fmt: skip
        return solo

    def _done(self, generation: Generation, sequence_tokens: int, hit: PrefixHit) -> WorkDone:
        """The generation's result and usage, counted; `hit` is where its start came from."""
        result = generation.result
        if result is None:  # pragma: no cover - the engine sets it before its iterator ends
            raise RuntimeError("generation ended without a result")
        tiers = hit.by_tier(result.usage.cached_tokens)
        self.counters.count(
            cached_local_tokens=tiers.local,
            cached_node_tokens=tiers.node,
            cached_store_tokens=tiers.store,
            computed_tokens=max(0, sequence_tokens - tiers.total),
            recomputed_tokens=hit.recomputed_tokens,
            plan=hit.plan,
        )
        return WorkDone(
            finish_reason=result.finish_reason,
            token_ids=tuple(result.token_ids),
            text=result.text,
            usage=WorkUsage(
                prompt_tokens=result.usage.prompt_tokens,
                cached_local_tokens=tiers.local,
                cached_store_tokens=tiers.store,
                completion_tokens=result.usage.completion_tokens,
                ttft_ms=result.usage.ttft_ms,
                tokens_per_s=result.usage.tokens_per_s,
                worker=self.worker_id,
                evicted_tokens=result.usage.evicted_tokens,
                cached_node_tokens=tiers.node,
                plan=hit.plan,
                recomputed_tokens=hit.recomputed_tokens,
            ),
        )

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        """Compute and store the full blocks of `token_ids`; returns once they are stored."""
        chain = BlockChain(self.namespace(tenant), None)
        hashes = chain.hashes(token_ids)
        start = self.starts.find(hashes, token_ids)
        chunked = self.engine.native_window is not None
        # This call's own blocks, written here once computed: waiting on the shared write-behind
        # queue would also wait for every other request's blocks.
        batches: list[WriteBatch] = []
        cutter = Cutter(chain, start.hit.tokens // self.config.block_tokens, batches.append)
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
            cached_tokens=start.hit.by_tier(start.hit.tokens).total,
            worker=self.worker_id,
        )

    def _submitter(self, stored: Sequence[BlockHash]) -> Callable[[WriteBatch], object]:
        """Where cut blocks go: behind to every tier, but blocks of `stored` (held by the node
        tier or the store already: a prefix the plan recomputed) to L1 only."""
        if not stored:
            return self.writer.submit
        held = set(stored)

        def submit(batch: WriteBatch) -> None:
            again = [item for item in batch if item[0] in held]
            new = [item for item in batch if item[0] not in held]
            self.writer.submit(again, shared=False)
            self.writer.submit(new)

        return submit

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

    def forget_local(self, timeout_s: float = 30.0) -> None:
        """Empty L1 once the write-behind queue is done (which may still be filling it with
        copies of a fetched run): benchmarks and tests start each cold run from here."""
        self.writer.flush(timeout_s)
        self.local.clear()

    def stats(self) -> WorkerStats:
        running, waiting = self.scheduler.occupancy()
        batch = self.scheduler.stats
        return WorkerStats(
            worker_id=self.worker_id,
            **self.counters.snapshot(),
            local=self.local.stats(),
            writes=self.writer.stats(),
            node=self._node_stats(),
            estimates=self.estimates.snapshot(),
            batch_running=running,
            batch_waiting=waiting,
            batch_steps=batch.steps,
            batch_largest=batch.largest_batch,
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
        self.scheduler.close()
        self.writer.close()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    # --- internals ---------------------------------------------------------------------------

    def _encode(self, block: torch.Tensor, block_hash: BlockHash) -> bytes:
        return encode_block(block, self.config.codec, block_hash)

    def decode_stored(self, data: bytes, block_hash: BlockHash) -> torch.Tensor:
        # [layers, 2, kv_heads, block_tokens, head_dim] on the model's device: on a GPU the
        # quantized sections cross the bus and are dequantized there, a quarter of the bytes.
        return decode_block(
            data,
            expected_hash=block_hash,
            geometry=self.loaded.geometry,
            block_tokens=self.config.block_tokens,
            device=self.loaded.device,
            staging=self.staging,
        )

    def _store_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        try:
            return self.store.lookup([block_key(h) for h in hashes]) if self.store else 0
        except Exception as exc:
            log.warning("store lookup after prefill failed: %s", exc)
            self.counters.count(store_errors=1)
            return 0


class _Solo:
    """A sequence decoded alone, in the request's thread: its blocks are cut after each token."""

    generation: Generation

    def __init__(self, cutter: Cutter) -> None:
        self._cutter = cutter
        self.prefilling = True
        self.prefill_s = 0.0  # until the first token: the engine's prefill and its sampling

    def __iter__(self) -> Iterator[TokenEvent]:
        began = time.perf_counter()
        try:
            for event in self.generation:
                if self.prefilling:
                    self.prefilling = False
                    self.prefill_s = time.perf_counter() - began
                yield event  # first, so that cutting blocks never delays a token
                self._cutter(self.generation)
        finally:
            self._cutter(self.generation)

    def cancel(self) -> None:
        """Nothing to leave: the request's own thread stops reading."""


class _Cancelled(Exception):
    """Raised between prefill chunks of a request whose caller cancelled it."""
