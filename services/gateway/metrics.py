"""The gateway's Prometheus metrics (every one is listed in docs/gateway.md, "Metrics").

Each gateway owns its registry (no global state), so tests can run several in one process.
Worker-side figures (L1 size, store errors, write-behind drops) are pulled from the workers when
Prometheus scrapes, by a collector with a short deadline; a worker that does not answer in time
is simply absent from that scrape.
"""

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.api import PLAN_KINDS

if TYPE_CHECKING:
    from services.gateway.api import Usage
    from workers.api import WorkerStats

# TTFT spans an L1 hit on a GPU (ms) to a cold multi-thousand-token prefill on a CPU (s).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)

MAX_TENANT_LABELS = 100  # tenants with series of their own; later ones share OTHER_TENANT
OTHER_TENANT = "_other"


class TenantLabels:
    """The `tenant` label value of each tenant, from a bounded set.

    The first `limit` tenants seen keep their own name; every later one is counted under
    `OTHER_TENANT`. With auth off any caller names any tenant, and each new name was a new set
    of series, growing the gateway's memory and Prometheus' without bound.
    """

    def __init__(self, limit: int = MAX_TENANT_LABELS) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self._limit:
                self._seen.add(tenant)
                return tenant
        return OTHER_TENANT


class _ByTenant:
    """A labelled metric whose first label is a tenant, mapped through `TenantLabels`."""

    def __init__(self, metric: Counter, tenants: TenantLabels) -> None:
        self._metric = metric
        self._tenants = tenants

    def labels(self, tenant: str, *rest: str) -> Counter:
        return self._metric.labels(self._tenants(tenant), *rest)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "kvpool_gateway_calls", "Finished RPCs by method and status code.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.call_seconds = Histogram(
            "kvpool_gateway_call_seconds", "RPC duration, whole stream included.",
            ["method"], registry=r, buckets=_TTFT_BUCKETS,
        )  # fmt: skip
        self.ttft = Histogram(
            "kvpool_gateway_ttft_seconds",
            "Gateway receipt to first token, by where the prompt's cached prefix came from.",
            ["cache"], registry=r, buckets=_TTFT_BUCKETS,
        )  # fmt: skip
        self._tenant_series(r)
        self._event_series(r)
        self.in_flight = Gauge(
            "kvpool_gateway_in_flight", "Generate streams open right now.", registry=r
        )

    def _tenant_series(self, r: CollectorRegistry) -> None:
        """Requests and tokens by tenant."""
        # tenant labels: one series per tenant, from a bounded set (docs/gateway.md, "Metrics").
        self.tenant_labels = tenants = TenantLabels()
        self.requests = _ByTenant(
            Counter(
                "kvpool_gateway_requests", "Generate requests received.", ["tenant"], registry=r
            ),
            tenants,
        )
        self.limit_rejections = Counter(
            "kvpool_gateway_limit_rejections", "Requests refused by a configured limit.",
            ["limit"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = _ByTenant(Counter(
            "kvpool_gateway_prompt_tokens", "Prompt tokens served.", ["tenant"], registry=r
        ), tenants)  # fmt: skip
        self.cached_tokens = _ByTenant(Counter(
            "kvpool_gateway_cached_tokens",
            "Prompt tokens whose KV came from a cache tier instead of a prefill.",
            ["tenant", "tier"], registry=r,
        ), tenants)  # fmt: skip
        self.completion_tokens = _ByTenant(Counter(
            "kvpool_gateway_completion_tokens", "Tokens generated.", ["tenant"], registry=r
        ), tenants)  # fmt: skip
        self.bounded_requests = _ByTenant(Counter(
            "kvpool_gateway_bounded_requests",
            "Generate requests whose KV cache was bounded (max_cache_tokens).",
            ["tenant"], registry=r,
        ), tenants)  # fmt: skip
        self.evicted_tokens = _ByTenant(Counter(
            "kvpool_gateway_evicted_tokens",
            "Tokens no longer in a bounded request's cache when it finished.",
            ["tenant"], registry=r,
        ), tenants)  # fmt: skip

    def _event_series(self, r: CollectorRegistry) -> None:
        """Fetch plans, failovers and lost work."""
        self.plans = Counter(
            "kvpool_gateway_fetch_plans",
            "Generate requests by the fetch plan of their cached prefix (workers.plan).",
            ["plan"], registry=r,
        )  # fmt: skip
        self.recomputed_tokens = Counter(
            "kvpool_gateway_recomputed_tokens",
            "Cached prompt tokens that the fetch plan recomputed because that was faster.",
            registry=r,
        )
        self.failovers = Counter(
            "kvpool_gateway_failovers", "Streams moved to another worker after one died.",
            registry=r,
        )  # fmt: skip
        self.session_save_failures = Counter(
            "kvpool_gateway_session_save_failures",
            "Session turns generated and streamed whose history the store could not save.",
            registry=r,
        )  # fmt: skip
        self.lost_sessions = Counter(
            "kvpool_gateway_lost_sessions",
            "Turns of sessions saved here and gone from the store before their TTL, refused "
            "NOT_FOUND.",
            registry=r,
        )  # fmt: skip

    def observe_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """`services.status.CallObserver`: every finished RPC."""
        short = method.rsplit("/", 1)[-1]
        self.calls.labels(short, code.name).inc()
        self.call_seconds.labels(short).observe(seconds)

    def observe_generate(self, usage: "Usage", tenant: str) -> None:
        work = usage.work
        self.prompt_tokens.labels(tenant).inc(work.prompt_tokens)
        self.cached_tokens.labels(tenant, "local").inc(work.cached_local_tokens)
        self.cached_tokens.labels(tenant, "node").inc(work.cached_node_tokens)
        self.cached_tokens.labels(tenant, "store").inc(work.cached_store_tokens)
        if work.plan in PLAN_KINDS:  # a bounded label set, whatever a worker reports
            self.plans.labels(work.plan).inc()
        self.recomputed_tokens.inc(work.recomputed_tokens)
        self.completion_tokens.labels(tenant).inc(work.completion_tokens)
        if usage.bounded:
            self.bounded_requests.labels(tenant).inc()
            self.evicted_tokens.labels(tenant).inc(work.evicted_tokens)
        tiers = [
            tier
            for tier, tokens in (
                ("local", work.cached_local_tokens),
                ("node", work.cached_node_tokens),
                ("store", work.cached_store_tokens),
            )
            if tokens
        ]
        cache = "mixed" if len(tiers) > 1 else tiers[0] if tiers else "miss"
        self.ttft.labels(cache).observe(usage.ttft_ms / 1000.0)

    def watch_workers(
        self,
        stats: Callable[[], Sequence["WorkerStats"]],
        live: Callable[[], int],
        deaths: Callable[[], int],
    ) -> None:
        """Report worker figures, pulled at scrape time through `stats`."""
        self.registry.register(_WorkerCollector(stats, live, deaths))


_G, _C, _W = GaugeMetricFamily, CounterMetricFamily, ["worker"]
# name (after kvpool_worker_) -> (kind, help, labels)
_WORKER_FAMILIES: dict[str, tuple[type, str, list[str]]] = {
    "l1_bytes": (_G, "Bytes of decoded blocks held in L1.", _W),
    "l1_capacity_bytes": (_G, "L1 byte bound.", _W),
    "l1_blocks": (_G, "Blocks held in L1.", _W),
    "l1_evictions": (_C, "Blocks evicted from L1 for space.", _W),
    "cached_tokens": (_C, "Prompt tokens served from a cache tier.", ["worker", "tier"]),
    "recomputed_tokens": (_C, "Cached prompt tokens the fetch plan recomputed.", _W),
    "fetch_plans": (_C, "Requests by fetch plan.", ["worker", "plan"]),
    "plan_estimate": (_G, "The fetch plan's running cost estimates.", ["worker", "estimate"]),
    "node_tier_bytes": (_G, "Bytes held by this worker's node tier (L2).", _W),
    "node_tier_hits": (_C, "Blocks found in this worker's node tier (all its readers).", _W),
    "node_tier_evictions": (_C, "Blocks evicted from this worker's node tier for space.", _W),
    "computed_tokens": (_C, "Prompt tokens prefilled because no tier held them.", _W),
    "corrupt_blocks": (_C, "Stored blocks refused by verification (deleted).", _W),
    "store_errors": (_C, "Store reads that failed and were served as misses.", _W),
    "node_tier_errors": (_C, "Node tier reads that failed and were served as misses.", _W),
    "blocks_written": (_C, "Blocks the store accepted from write-behind.", _W),
    "write_dropped_blocks": (_C, "Blocks not written because the write queue was full.", _W),
    "write_failed_blocks": (_C, "Blocks not written because the store failed.", _W),
    "copy_dropped_blocks": (
        _C,
        "Fetched blocks L1 and the node tier did not take: the write queue was full.",
        _W,
    ),
    "write_pending_blocks": (_G, "Blocks waiting in the write-behind queue.", _W),
    "in_flight": (_G, "Generations running on the worker.", _W),
    "batch_sequences": (_G, "Sequences prefilling or decoding in the worker's batch.", _W),
    "batch_waiting": (_G, "Sequences waiting for room in the worker's batch.", _W),
    "batch_steps": (_C, "Batched decode steps (one forward pass each).", _W),
}


class _WorkerCollector(Collector):
    def __init__(
        self,
        stats: Callable[[], Sequence["WorkerStats"]],
        live: Callable[[], int],
        deaths: Callable[[], int],
    ) -> None:
        self._stats, self._live, self._deaths = stats, live, deaths

    def describe(self) -> list[Metric]:
        return []  # values come from workers at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kvpool_gateway_workers_live", "Workers serving.", self._live())
        yield CounterMetricFamily(
            "kvpool_gateway_worker_deaths", "Workers lost (died or stalled).", self._deaths()
        )
        families = {
            name: kind(f"kvpool_worker_{name}", doc, labels=labels)
            for name, (kind, doc, labels) in _WORKER_FAMILIES.items()
        }
        for s in self._stats():
            w = [s.worker_id]
            families["l1_bytes"].add_metric(w, s.local.bytes)
            families["l1_capacity_bytes"].add_metric(w, s.local.capacity_bytes)
            families["l1_blocks"].add_metric(w, s.local.blocks)
            families["l1_evictions"].add_metric(w, s.local.evictions)
            families["cached_tokens"].add_metric([s.worker_id, "local"], s.cached_local_tokens)
            families["cached_tokens"].add_metric([s.worker_id, "node"], s.cached_node_tokens)
            families["cached_tokens"].add_metric([s.worker_id, "store"], s.cached_store_tokens)
            families["recomputed_tokens"].add_metric(w, s.recomputed_tokens)
            for plan, count in s.plans.items():
                families["fetch_plans"].add_metric([s.worker_id, plan], count)
            for name, value in s.estimates.items():
                families["plan_estimate"].add_metric([s.worker_id, name], value)
            if s.node is not None:
                families["node_tier_bytes"].add_metric(w, s.node.bytes)
                families["node_tier_hits"].add_metric(w, s.node.hits)
                families["node_tier_evictions"].add_metric(w, s.node.evictions)
            families["computed_tokens"].add_metric(w, s.computed_tokens)
            families["corrupt_blocks"].add_metric(w, s.corrupt_blocks)
            families["store_errors"].add_metric(w, s.store_errors)
            families["node_tier_errors"].add_metric(w, s.node_errors)
            families["blocks_written"].add_metric(w, s.writes.stored)
            families["write_dropped_blocks"].add_metric(w, s.writes.dropped)
            families["write_failed_blocks"].add_metric(w, s.writes.failed)
            families["copy_dropped_blocks"].add_metric(w, s.writes.dropped_copies)
            families["write_pending_blocks"].add_metric(w, s.writes.pending)
            families["in_flight"].add_metric(w, s.in_flight)
            families["batch_sequences"].add_metric(w, s.batch_running)
            families["batch_waiting"].add_metric(w, s.batch_waiting)
            families["batch_steps"].add_metric(w, s.batch_steps)
        yield from families.values()
