"""The vLLM connector's metrics: what it counts, how the counts of many steps and workers add up,
and the two registries that show them (docs/vllm.md, "Metrics", lists every one).

The counts travel as the `data` of vLLM's `KVConnectorStats` (`vllm.KVPoolStats`, a thin shell
over the functions here). The worker side fills one per step (what it loaded and saved, how
long that took, what failed), the scheduler side adds the plans it chose, and vLLM adds them up
over workers and steps before its Prometheus logger hands them to `VllmSeries`, which shows them
as `vllm:kvpool_*` with vLLM's own `model_name` and `engine` labels. `ConnectorTotals` keeps
running totals of the same counts in the scheduler's process, for the `metrics_port` of
`kv_connector_extra_config` (`kvpool_connector_*`).

    {"loaded_tokens": {"store": 1920},      a counter: amounts by label value ("" if unlabelled)
     "load_seconds": [0.21],                a histogram: its samples, one per observation
     "fetch": [[31457280, 0.21]],           the fetch plan's samples: [bytes, seconds] ...
     "forward": [[17, 2048, 0.9]]}          ... and [tokens, prompt end, seconds]; not metrics

Every label takes its values from a fixed set (`Spec.values`); counting under any other value
is a bug and raises, so no series set can grow. No vLLM import: this is unit-tested alone.
"""

import threading
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from workers.api import PLAN_KINDS
from workers.plan import TIERS

VLLM_PREFIX = "vllm:kvpool_"  # vLLM's connectors name theirs vllm:nixl_*, vllm:kv_offload_*, ...
OWN_PREFIX = "kvpool_connector_"
COUNTER, HISTOGRAM = "counter", "histogram"
# missing: the store answered without it (evicted since the lookup); damaged: it failed the
# checks and was deleted; unavailable: the store call failed (down, or past its deadline).
LOAD_ERRORS = ("missing", "damaged", "unavailable")
# stored: the store kept it; dropped: the write-behind queue was full; failed: the put failed
# or the store did not keep it.
SAVE_OUTCOMES = ("stored", "dropped", "failed")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PLAN_SAMPLES = ("fetch", "forward")


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric: its key in the stats' data (its name after the prefix), its type, and its one
    label's allowed values, if it has a label."""

    key: str
    kind: str
    doc: str
    label: str = ""
    values: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (COUNTER, HISTOGRAM):
            raise ValueError(f"metric kind must be {COUNTER} or {HISTOGRAM}, got {self.kind!r}")
        if bool(self.label) != bool(self.values) or (self.label and self.kind == HISTOGRAM):
            raise ValueError(f"{self.key}: a label needs its values, and only counters have one")

    @property
    def label_values(self) -> tuple[str, ...]:
        return self.values or ("",)


METRICS = (
    Spec("loaded_tokens", COUNTER, "Prompt tokens written into vLLM's KV cache from a kvpool "
         "tier instead of being computed", "tier", TIERS),
    Spec("loaded_bytes", COUNTER, "Encoded block bytes read from a kvpool tier for loads",
         "tier", TIERS),
    Spec("load_seconds", HISTOGRAM, "One request's load before the forward pass: the read, the "
         "checks and the copy into vLLM's pages", buckets=SECONDS_BUCKETS),
    Spec("load_errors", COUNTER, "Blocks that failed to load (the first failure and every block "
         "after it in that load), which vLLM computed instead", "reason", LOAD_ERRORS),
    Spec("plans", COUNTER, "Requests scheduled, by the fetch plan chosen for them", "plan",
         PLAN_KINDS),
    Spec("save_seconds", HISTOGRAM, "One step's saves on the forward pass's path: copying its "
         "completed blocks out of vLLM's pages and queueing them", buckets=SECONDS_BUCKETS),
    Spec("saved_blocks", COUNTER, "Prompt blocks queued for the store, by outcome", "outcome",
         SAVE_OUTCOMES),
    Spec("saved_bytes", COUNTER, "Encoded block bytes the store kept"),
)  # fmt: skip
SPECS = {spec.key: spec for spec in METRICS}


def _spec(key: str) -> Spec:
    if key not in SPECS:
        raise ValueError(f"unknown kvpool metric {key!r}; known: {', '.join(SPECS)}")
    return SPECS[key]


def count(data: dict[str, Any], key: str, amount: float, value: str = "") -> None:
    """Add `amount` to counter `key` under label value `value` ("" for an unlabelled one)."""
    spec = _spec(key)
    if spec.kind != COUNTER:
        raise ValueError(f"{key} is a histogram: it takes samples (observe), not counts")
    if value not in spec.label_values:
        raise ValueError(
            f"{key}: its {spec.label or 'label'} is one of {spec.label_values}, got {value!r}"
        )
    amounts = data.setdefault(key, {})
    amounts[value] = amounts.get(value, 0) + amount


def observe(data: dict[str, Any], key: str, sample: Any) -> None:
    """Record one sample of histogram `key`, or of one of the fetch plan's series."""
    if key not in PLAN_SAMPLES and _spec(key).kind != HISTOGRAM:
        raise ValueError(f"{key} is a counter, not a histogram")
    data.setdefault(key, []).append(sample)


def merge(into: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Add `other`'s counts to `into` (counters summed, samples joined); `into` shares nothing
    with `other` afterwards, so adding to it later never changes what `other` said."""
    for key, value in other.items():
        if key in PLAN_SAMPLES or _spec(key).kind == HISTOGRAM:
            if not isinstance(value, list):
                raise ValueError(f"{key} is a histogram: it takes a list of samples, not {value!r}")
            into.setdefault(key, []).extend(list(s) if isinstance(s, list) else s for s in value)
        else:
            for label, amount in value.items():
                count(into, key, amount, label)
    return into


def is_empty(data: Mapping[str, Any]) -> bool:
    return not any(
        any(value.values()) if isinstance(value, Mapping) else value for value in data.values()
    )


def reduce(data: Mapping[str, Any]) -> dict[str, int | float]:
    """One line of vLLM's stats log: each nonzero counter by label, each histogram's count and
    sum (`load_seconds.sum`, `plans.fetch`, `saved_bytes`)."""
    line: dict[str, int | float] = {}
    for spec in METRICS:
        if spec.kind == HISTOGRAM:
            samples = data.get(spec.key, ())
            if samples:
                line[f"{spec.key}.count"] = len(samples)
                line[f"{spec.key}.sum"] = round(sum(samples), 6)
            continue
        for label, amount in data.get(spec.key, {}).items():
            if amount:
                line[f"{spec.key}.{label}" if label else spec.key] = amount
    return line


class VllmSeries:
    """The counts as vLLM's Prometheus logger shows them: metrics made with the classes vLLM
    hands to `build_prom_metrics` (its registry, and its multiprocess mode under `vllm serve`),
    labelled with vLLM's engine labels and then the metric's own. Every series is made up front,
    so each shows 0 from the start instead of appearing at its first count."""

    def __init__(
        self,
        counter_cls: Any,
        histogram_cls: Any,
        labelnames: list[str],
        per_engine_labelvalues: Mapping[int, list[object]],
    ) -> None:
        self._series: dict[tuple[int, str, str], Any] = {}
        for spec in METRICS:
            names = [*labelnames, spec.label] if spec.label else list(labelnames)
            if spec.kind == COUNTER:
                metric = counter_cls(
                    name=VLLM_PREFIX + spec.key, documentation=spec.doc, labelnames=names
                )
            else:
                metric = histogram_cls(
                    name=VLLM_PREFIX + spec.key, documentation=spec.doc, labelnames=names,
                    buckets=list(spec.buckets),
                )  # fmt: skip
            for engine, engine_values in per_engine_labelvalues.items():
                for value in spec.label_values:
                    values = [*engine_values, value] if spec.label else list(engine_values)
                    # a metric without label names is its own (only) series
                    series = metric.labels(*values) if names else metric
                    self._series[engine, spec.key, value] = series

    def observe(self, data: Mapping[str, Any], engine: int = 0) -> None:
        for key, value in data.items():
            if key in PLAN_SAMPLES:
                continue
            if _spec(key).kind == HISTOGRAM:
                series = self._series[engine, key, ""]
                for sample in value:
                    series.observe(sample)
            else:
                for label, amount in value.items():
                    self._series[engine, key, label].inc(amount)


class ConnectorTotals:
    """Running totals of the counts in the scheduler's process, served as `kvpool_connector_*`
    from a registry of its own (`serve`).

    A collector of plain numbers, not prometheus_client's metric classes: under `vllm serve`
    with several API servers the engine core inherits PROMETHEUS_MULTIPROC_DIR, and metrics made
    with those classes would land in vLLM's own /metrics as well."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = {
            (spec.key, value): 0.0
            for spec in METRICS
            if spec.kind == COUNTER
            for value in spec.label_values
        }
        # per histogram: a count per bucket (the last one +Inf), and the samples' sum
        self._histograms = {
            spec.key: ([0] * (len(spec.buckets) + 1), [0.0])
            for spec in METRICS
            if spec.kind == HISTOGRAM
        }
        self._http: Any = None

    def add(self, data: Mapping[str, Any]) -> None:
        with self._lock:
            for key, value in data.items():
                if key in PLAN_SAMPLES:
                    continue
                spec = _spec(key)
                if spec.kind == HISTOGRAM:
                    buckets, total = self._histograms[key]
                    for sample in value:
                        buckets[bisect_left(spec.buckets, sample)] += 1
                        total[0] += sample
                    continue
                for label, amount in value.items():
                    if (key, label) not in self._counters:
                        raise ValueError(f"{key}: {label!r} is not one of {spec.label_values}")
                    self._counters[key, label] += amount

    def value(self, key: str, label: str = "") -> float:
        """A counter's total, or a histogram's sample count."""
        with self._lock:
            if key in self._histograms:
                return sum(self._histograms[key][0])
            return self._counters[key, label]

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counters = dict(self._counters)
            histograms = {k: (list(b), t[0]) for k, (b, t) in self._histograms.items()}
        for spec in METRICS:
            name = OWN_PREFIX + spec.key
            if spec.kind == COUNTER:
                family = CounterMetricFamily(
                    name, spec.doc, labels=[spec.label] if spec.label else []
                )
                for value in spec.label_values:
                    family.add_metric([value] if spec.label else [], counters[spec.key, value])
                yield family
                continue
            buckets, total = histograms[spec.key]
            cumulative, running = [], 0
            for bound, n in zip((*spec.buckets, float("inf")), buckets, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))  # as prometheus_client
            histogram = HistogramMetricFamily(name, spec.doc)
            histogram.add_metric([], cumulative, sum_value=total)
            yield histogram

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on HOST:PORT (0: one the kernel picks); returns the port."""
        registry = CollectorRegistry()
        registry.register(self)
        self._http, _thread = start_http_server(port, addr=host, registry=registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
