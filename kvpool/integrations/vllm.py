"""KVPoolConnector: kvpool as vLLM's KV store, through vLLM's KV connector API (v1).

    LLM(model, kv_transfer_config={
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"store": "127.0.0.1:50052", "codec": "int8"},
    })

Scheduler side (vLLM's engine core): for a new request, one `Lookup` of the prompt's chained
block keys says how many of its blocks the store holds; the fetch plan (`workers.plan`, fed by
the worker side's measured loads and forward passes) says whether loading them beats computing
them; the answer to `get_num_new_matched_tokens` is the tokens worth loading, else 0. It also
decides, step by step, which full prompt blocks the step completes and the store lacks: those
are saved.

Worker side (the model runner): before the forward pass, the blocks to load are read from the
store in one `Get`, checked (framing, checksums, hash, geometry, finiteness) and written into
the engine's paged KV tensors (`vllm_layout`); a block that is missing, damaged or late, and
every block after it, is reported to vLLM as a load error, and vLLM computes those tokens
itself. After the pass, completed blocks are copied out and handed to the write-behind thread,
which encodes them in kvpool's block format and puts them in the store off the critical path.

Keys: kvpool's chained SHA-256 (`workers.kv.hashing`) over the token ids, in a namespace that
names the engine ("vllm"), the model and its config, the KV dtype, the codec, the block size
and the tenant's HMAC salt: an engine with other numerics never reads another's blocks, and one
tenant never reads another's. docs/vllm.md says what is and is not supported.

Metrics: both sides count into `KVPoolStats` (the schema is `vllm_metrics`), which vLLM adds up
over workers and steps and shows through `build_prom_metrics` as `vllm:kvpool_*`; with
`metrics_port` the scheduler side also serves the totals itself as `kvpool_connector_*`.

This is the only kvpool module that imports vLLM.
"""

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvpool.errors import InvalidArgument, KvpoolError
from kvpool.integrations import vllm_metrics as metrics
from kvpool.integrations.vllm_layout import PagedLayout
from kvpool.integrations.vllm_settings import ConnectorSettings
from services.store.client import StoreClient
from workers.kv.block import BlockFormatError, decode_block, encode_block, encoded_bytes_per_token
from workers.kv.codec import dtype_name
from workers.kv.geometry import KVGeometry
from workers.kv.hashing import BlockHash, Namespace, block_key, chain_hashes, tenant_salt
from workers.plan import CachedRun, Estimates, choose
from workers.tiers import WriteBehind

log = logging.getLogger(__name__)

ENGINE = "vllm"


@dataclass
class _Load:
    """Blocks of one request to read into the engine's pages before this step's forward pass."""

    req_id: str
    hashes: list[bytes]  # kvpool blocks first_block, first_block + 1, ...
    first_block: int
    engine_blocks: list[int]  # the request's vLLM block ids, all of them
    skip: int  # tokens vLLM already has (its own prefix cache): not written


@dataclass
class _Save:
    """Full prompt blocks this step completes and the store lacks: copied out after the pass."""

    hashes: list[bytes]
    engine_blocks: list[int]  # per_block vLLM block ids per kvpool block, in order


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)
    step_tokens: int = 0  # tokens this step computes, and where the longest prefill ends
    step_end: int = 0
    single_prefill: bool = False  # one request, prefilling: its pass times the prefill rate


class KVPoolStats(KVConnectorStats):
    """What one side measured since its last report: counters by label, histogram samples, and
    the samples the scheduler side's fetch plan learns from (`vllm_metrics` has the schema)."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        # A copy: vLLM builds one from a payload that its other stat loggers read, then adds the
        # next payloads to it.
        super().__init__(data=metrics.merge({}, data or {}))

    def reset(self) -> None:
        self.data = {}

    def count(self, key: str, amount: float, value: str = "") -> None:
        metrics.count(self.data, key, amount, value)

    def observe(self, key: str, sample: Any) -> None:
        metrics.observe(self.data, key, sample)

    def aggregate(self, other: KVConnectorStats) -> "KVPoolStats":
        metrics.merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return metrics.reduce(self.data)

    def is_empty(self) -> bool:
        return metrics.is_empty(self.data)


class KVPoolPromMetrics(KVConnectorPromMetrics):
    """The counts in vLLM's Prometheus output (`vllm:kvpool_*`), made with the metric classes
    vLLM passes in, so they follow its registry and its multiprocess mode."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._series = metrics.VllmSeries(
            self._counter_cls, self._histogram_cls, labelnames, per_engine_labelvalues
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        self._series.observe(transfer_stats_data, engine_idx)


class _CountedPuts:
    """The store as the write-behind thread sees it (it only puts): each put's outcome goes into
    the connector's stats."""

    def __init__(self, store: StoreClient, on_put: Callable[[int, int, int], None]) -> None:
        self._store, self._on_put = store, on_put  # on_put(stored, failed, stored bytes)

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int:
        try:
            stored = self._store.put_many(items, ttl_s=ttl_s)
        except Exception:
            self._on_put(0, len(items), 0)
            raise  # the write-behind logs it
        # The blocks of one engine all encode to one size: the kept share of the bytes is exact.
        nbytes = sum(len(value) for _, value in items) * stored // max(len(items), 1)
        self._on_put(stored, len(items) - stored, nbytes)
        return stored


def model_fingerprint(vllm_config: Any) -> str:
    """Names the model's numerics: its config (less the path it was loaded from), the compute
    dtype and the KV cache dtype. Two engines of the same model and dtypes share blocks."""
    model = vllm_config.model_config
    config = model.hf_config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    kv_dtype = vllm_config.cache_config.cache_dtype
    return f"{ENGINE}|{digest[:24]}|{dtype_name(model.dtype)}|kv:{kv_dtype}"


def engine_geometry(vllm_config: Any, block_tokens: int) -> KVGeometry:
    """The KV cache's shape, once the engine is one the connector supports: one process (no
    tensor or pipeline parallel), a KV cache in the model's dtype, and kvpool blocks of whole
    vLLM blocks."""
    parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise InvalidArgument(
            "kvpool connector: tensor and pipeline parallel engines are not supported yet "
            f"(tensor_parallel_size={parallel.tensor_parallel_size}, "
            f"pipeline_parallel_size={parallel.pipeline_parallel_size})"
        )
    if block_tokens % cache.block_size:
        raise InvalidArgument(
            f"kvpool connector: block_tokens ({block_tokens}) must be a multiple of "
            f"vLLM's block size ({cache.block_size})"
        )
    if cache.cache_dtype != "auto":
        raise InvalidArgument(
            f"kvpool connector: a quantized vLLM KV cache (cache_dtype={cache.cache_dtype}) "
            "is not supported; kvpool's codec quantizes the blocks it stores"
        )
    model = vllm_config.model_config
    return KVGeometry(
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=dtype_name(model.dtype),  # the KV cache's, with cache_dtype "auto"
    )


class KVPoolConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.settings = ConnectorSettings.from_extra(transfer.kv_connector_extra_config)
        self._engine_block = vllm_config.cache_config.block_size
        self._block_tokens = self.settings.block_tokens or self._engine_block
        self._geometry = engine_geometry(vllm_config, self._block_tokens)
        # A block that cannot be loaded is computed again, never a failed request.
        transfer.kv_load_failure_policy = self.settings.on_load_error
        parallel = vllm_config.parallel_config
        self._codec = self.settings.codec_for(self._geometry.dtype)
        self._fingerprint = model_fingerprint(vllm_config)
        self._store = StoreClient(
            self.settings.store, timeout_s=self.settings.timeout_s, retries=1,
            auth_token=self.settings.auth_token,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._stats = KVPoolStats()
        if role == KVConnectorRole.SCHEDULER:
            self._requests: dict[str, _Request] = {}
            self._totals = self._serve_metrics(parallel.data_parallel_size)
            self._estimates = Estimates("cuda" if torch.cuda.is_available() else "cpu")
            self._block_bytes = int(
                encoded_bytes_per_token(self._codec, self._geometry, self._block_tokens)
                * self._block_tokens
            )
        else:
            self._layout: PagedLayout | None = None
            self._errors: set[int] = set()
            self._writer = WriteBehind(
                encode=lambda kv, h: encode_block(kv, self._codec, h),
                decode=None,  # no local tier: nothing is decoded back
                local=None,
                store=_CountedPuts(self._store, self._count_saves),
                max_pending_blocks=self.settings.max_pending_blocks,
            )
            self._step_started: float | None = None  # when this step's pass began
            self._step_load_s = 0.0
        log.info(
            "kvpool connector (%s): store %s, codec %s, %d-token blocks over vLLM's %d, plan %s",
            role.name.lower(), self.settings.store, self._codec, self._block_tokens,
            self._engine_block, self.settings.plan,
        )  # fmt: skip

    # ---------------------------------------------------------------- scheduler side

    def _serve_metrics(self, data_parallel_size: int) -> metrics.ConnectorTotals | None:
        """kvpool's own /metrics (`metrics_port`), from this process: the engine core, where
        every worker's stats arrive each step. None when it is off."""
        port = self.settings.metrics_port
        if port is None:
            return None
        if data_parallel_size > 1:
            raise InvalidArgument(
                f"kvpool connector: metrics_port with data_parallel_size={data_parallel_size}: "
                "each engine core would bind the same port; leave metrics_port out and scrape "
                "vLLM's /metrics (vllm:kvpool_*, labelled by engine)"
            )
        totals = metrics.ConnectorTotals()
        try:
            totals.serve(self.settings.metrics_host, port)
        except OSError as exc:
            raise InvalidArgument(
                f"kvpool connector: metrics_port {port} on {self.settings.metrics_host} cannot "
                f"be bound: {exc}"
            ) from exc
        log.info("kvpool connector: metrics on http://%s:%d/metrics", self.settings.metrics_host,
                 port)  # fmt: skip
        return totals

    def _count_plan(self, kind: str) -> None:
        with self._lock:
            self._stats.count("plans", 1, kind)
        if self._totals is not None:
            self._totals.add({"plans": {kind: 1}})

    def _namespace(self, request: Any) -> Namespace | None:
        """The request's namespace, or None when it may not use the store (a cache_salt and no
        namespace secret to salt it with)."""
        salt = getattr(request, "cache_salt", None) or self.settings.tenant
        secret = self.settings.namespace_secret
        if salt and secret is None:
            return None
        tenant = tenant_salt(salt or "", secret) if secret is not None else ""
        return Namespace(self._fingerprint, self._codec, self._block_tokens, tenant=tenant)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int):
        tokens = list(request.prompt_token_ids or ())
        earlier = self._requests.get(request.request_id)
        if earlier is not None:  # asked again while it waits for room: the prompt is the same
            hashes, namespace = earlier.hashes, earlier.namespace
        else:
            namespace = self._namespace(request)
            if namespace is None:  # untracked: counted as plan "none" once it is scheduled
                return 0, False
            hashes = chain_hashes(namespace, tokens)
        try:
            stored = self._store.lookup([block_key(h) for h in hashes])
        except KvpoolError as exc:  # the store is down or slow: a plain miss
            log.debug("kvpool lookup failed, treating as a miss: %s", exc)
            stored = 0
        size = self._block_tokens
        loadable = min(stored, (len(tokens) - 1) // size)  # vLLM computes at least one token
        tracked = _Request(hashes=hashes, stored=stored, prompt_tokens=len(tokens),
                           namespace=namespace, request=request)  # fmt: skip
        self._requests[request.request_id] = tracked
        local = num_computed_tokens // size
        if loadable <= local or loadable * size <= num_computed_tokens:
            return 0, False
        run = CachedRun(size, len(tokens), local, 0, loadable - local, self._block_bytes)
        plan = choose(run, self._estimates, self.settings.plan)
        self._estimates.observe_plan(plan.kind)
        tracked.plan = plan.kind
        if plan.kind == "recompute":
            return 0, False
        # vLLM loads a contiguous run after its own prefix: a split's recomputed head cannot be
        # expressed, so a split is loaded whole (its prediction already beat recompute).
        tracked.load = (local, loadable, num_computed_tokens)
        return loadable * size - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int):
        # Once per scheduling from the waiting queue (again after a preemption): the plan that
        # took effect, not each time vLLM asked while it waited for room; "none" when nothing
        # is loaded (a fetch vLLM did not take, e.g. skip_reading_prefix_cache, included).
        tracked = self._requests.get(request.request_id)
        took = tracked is not None and (num_external_tokens > 0 or tracked.plan == "recompute")
        self._count_plan(tracked.plan if took and tracked is not None else "none")
        if tracked is not None and num_external_tokens == 0:
            tracked.load = None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = KVPoolMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        prefills = 0
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:
                continue
            tracked.engine_blocks = list(new.block_ids[0])
            if tracked.load is not None:
                first, end, skip = tracked.load
                meta.loads.append(
                    _Load(new.req_id, [bytes(h) for h in tracked.hashes[first:end]], first,
                          tracked.engine_blocks, skip - first * self._block_tokens)
                )  # fmt: skip
                tracked.load = None
            end = new.num_computed_tokens + scheduled.get(new.req_id, 0)
            prefills += self._plan_saves(tracked, end, meta)
            meta.step_end = max(meta.step_end, end)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:  # after a preemption: the whole list
                    tracked.engine_blocks = list(new_blocks[0])
                else:
                    tracked.engine_blocks.extend(new_blocks[0])
            end = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            prefills += self._plan_saves(tracked, end, meta)
            meta.step_end = max(meta.step_end, end)
        meta.step_tokens = scheduler_output.total_num_scheduled_tokens
        meta.single_prefill = len(scheduled) == 1 and prefills == 1
        return meta

    def _plan_saves(self, tracked: "_Request", end: int, meta: KVPoolMetadata) -> int:
        """Queue the blocks that tokens [0, end) complete and the store lacks (the prompt's, and
        with save_decode the generated tokens' too); 1 if the request is still prefilling."""
        size, per = self._block_tokens, self._block_tokens // self._engine_block
        complete = min(end, tracked.prompt_tokens) // size
        if self.settings.save_decode and end > tracked.prompt_tokens:
            complete = self._decode_blocks(tracked, end)
        first = max(tracked.saved, tracked.stored)
        if complete > first and len(tracked.engine_blocks) >= complete * per:
            meta.saves.append(
                _Save([bytes(h) for h in tracked.hashes[first:complete]],
                      tracked.engine_blocks[first * per : complete * per])
            )  # fmt: skip
            tracked.saved = complete
        return int(0 < end <= tracked.prompt_tokens)

    def _decode_blocks(self, tracked: "_Request", end: int) -> int:
        """The full blocks of tokens [0, end), prompt and output, their hashes extended to them.

        vLLM's request holds every token it sampled (`all_token_ids`); the KV of tokens [0, end)
        is in the engine's cache once this step's pass is done.
        """
        size = self._block_tokens
        assert tracked.namespace is not None  # a tracked request has one
        tokens = list(tracked.request.all_token_ids[:end])
        complete = len(tokens) // size
        have = len(tracked.hashes)
        if complete > have:
            parent = tracked.hashes[-1] if tracked.hashes else None
            tracked.hashes.extend(
                chain_hashes(tracked.namespace, tokens[have * size : complete * size], parent)
            )
        return complete

    def update_connector_output(self, connector_output: Any) -> None:
        stats = getattr(connector_output, "kv_connector_stats", None)
        if stats is None:
            return
        if self._totals is not None:
            self._totals.add(stats.data)
        for nbytes, seconds in stats.data.get("fetch", ()):
            self._estimates.observe_fetch("store", int(nbytes), float(seconds))
        for tokens, end, seconds in stats.data.get("forward", ()):
            self._estimates.observe_prefill(int(tokens), int(end), float(seconds))

    def request_finished(self, request: Any, block_ids: list[int]):
        self._requests.pop(request.request_id, None)
        return False, None  # saves copy their blocks out during the pass: free them now

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        g = self._geometry
        if len(kv_caches) != g.num_layers:
            raise InvalidArgument(
                f"kvpool connector: {len(kv_caches)} KV cache tensors for {g.num_layers} layers "
                "(hybrid and cross-layer caches are not supported)"
            )
        self._layout = PagedLayout.of(
            list(kv_caches.values()), g.num_kv_heads, g.head_dim, self._engine_block,
            self._block_tokens,
        )  # fmt: skip

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        # Called before every forward pass. start_load_kv is not a start mark: vLLM calls it
        # after the pass when the step loads nothing synchronously.
        super().bind_connector_metadata(connector_metadata)
        self._step_started = time.perf_counter()
        self._step_load_s = 0.0

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata) and self._layout is not None
        for load in meta.loads:
            started = time.perf_counter()
            self._load(load)
            self._step_load_s += time.perf_counter() - started

    def _load(self, load: _Load) -> None:
        layout, size, per = self._layout, self._block_tokens, self._layout.per_block
        keys = [block_key(BlockHash(h)) for h in load.hashes]
        started = time.perf_counter()
        loaded = nbytes = 0
        absent = "missing"  # why a block the lookup saw is not in the answer
        try:
            found = self._store.get_many(keys)
        except KvpoolError as exc:
            log.warning("kvpool load of %d blocks failed, vLLM computes them: %s", len(keys), exc)
            found, absent = {}, "unavailable"
        for n, (key, block_hash) in enumerate(zip(keys, load.hashes, strict=True)):
            value = found.get(key)
            index = load.first_block + n
            pages = load.engine_blocks[index * per : (index + 1) * per]
            skip = load.skip if n == 0 else 0
            try:
                if value is None:
                    raise BlockFormatError("missing", f"block {index} is not in the store")
                block = decode_block(
                    value, expected_hash=BlockHash(block_hash), geometry=self._geometry,
                    block_tokens=size,
                )  # fmt: skip
            except (BlockFormatError, InvalidArgument) as exc:
                reason = absent if value is None else "damaged"
                if value is not None:  # damaged: gone, so that the next save replaces it
                    self._delete(key)
                # This block and every later one are vLLM's to compute (a prefix stops here).
                end_page = (load.first_block + len(load.hashes)) * per
                failed = load.engine_blocks[index * per + skip // self._engine_block : end_page]
                with self._lock:
                    self._errors.update(failed)
                    self._stats.count("load_errors", len(load.hashes) - n, reason)
                log.warning(
                    "kvpool: %s; vLLM computes %d tokens", exc, len(failed) * self._engine_block
                )
                break
            layout.scatter(block, pages, skip=skip)
            loaded += size - skip
            nbytes += len(value)
        seconds = time.perf_counter() - started
        with self._lock:
            self._stats.count("loaded_tokens", loaded, "store")
            self._stats.count("loaded_bytes", nbytes, "store")
            self._stats.observe("load_seconds", seconds)
            if nbytes:
                self._stats.observe("fetch", [nbytes, seconds])

    def _delete(self, key: str) -> None:
        try:
            self._store.delete([key])
        except KvpoolError as exc:
            log.warning("kvpool: could not delete a damaged block: %s", exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the pass

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any):
        return  # a kvpool block holds every layer: blocks are cut in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata) and self._layout is not None
        if self._step_started is not None and meta.single_prefill and meta.step_tokens > 1:
            seconds = time.perf_counter() - self._step_started - self._step_load_s
            with self._lock:
                self._stats.observe("forward", [meta.step_tokens, meta.step_end, seconds])
        self._step_started = None
        started, dropped = time.perf_counter(), 0
        for save in meta.saves:
            blocks = self._layout.gather(save.engine_blocks).to("cpu")  # [n, L, 2, H, T, D]
            batch = [(BlockHash(h), blocks[i]) for i, h in enumerate(save.hashes)]
            if not self._writer.submit(batch):
                dropped += len(batch)
        if meta.saves:
            with self._lock:
                self._stats.observe("save_seconds", time.perf_counter() - started)
                if dropped:
                    self._stats.count("saved_blocks", dropped, "dropped")

    def _count_saves(self, stored: int, failed: int, nbytes: int) -> None:
        """The write-behind thread's outcome of one put: reported with the next step's stats."""
        with self._lock:
            self._stats.count("saved_blocks", stored, "stored")
            self._stats.count("saved_blocks", failed, "failed")
            self._stats.count("saved_bytes", nbytes)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KVPoolStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVPoolStats(data)

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued save is in the store (tests and benches)."""
        return self._writer.flush(timeout_s)

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.WORKER:
            self._writer.close()
        elif self._totals is not None:
            self._totals.close()
        self._store.close()


@dataclass
class _Request:
    """The scheduler side's view of one request."""

    hashes: list[BlockHash]
    stored: int  # leading prompt blocks the store held at lookup
    prompt_tokens: int
    saved: int = 0  # leading blocks queued for saving
    load: tuple[int, int, int] | None = None  # (first block, end block, tokens vLLM has)
    plan: str = "none"  # the fetch plan chosen at the last lookup (workers.api.PLAN_KINDS)
    engine_blocks: list[int] = field(default_factory=list)
    namespace: Namespace | None = None  # the hashes' (to extend them over generated tokens)
    request: Any = None  # vLLM's request: its all_token_ids grow as tokens are sampled
