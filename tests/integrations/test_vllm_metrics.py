"""The connector's counts as vLLM adds them up (workers, then steps, then the scheduler's own)
and as both registries show them: vLLM's, through the metric classes vLLM would hand over
(prometheus_client's own, on a registry of the test's), and kvpool's own /metrics. No vLLM here:
the vLLM classes are shells over this module, and the engine test covers them."""

import functools
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from kvpool.integrations import vllm_metrics as m

ENGINE_LABELS = ["model_name", "engine"]
ENGINES = {0: ["smollm2", "0"], 1: ["smollm2", "1"]}


def _worker_step(tokens: int, seconds: float) -> dict:
    data: dict = {}
    m.count(data, "loaded_tokens", tokens, "store")
    m.count(data, "loaded_bytes", tokens * 1000, "store")
    m.observe(data, "load_seconds", seconds)
    m.observe(data, "fetch", [tokens * 1000, seconds])
    return data


def test_counts_add_up_over_workers_steps_and_the_scheduler_by_label():
    step = m.merge({}, _worker_step(128, 0.02))  # two workers of one step, as vLLM aggregates
    m.merge(step, _worker_step(256, 0.03))
    scheduler: dict = {}
    m.count(scheduler, "plans", 1, "fetch")
    m.count(scheduler, "plans", 1, "none")
    m.merge(step, scheduler)
    later = _worker_step(64, 0.01)
    m.count(later, "load_errors", 3, "damaged")
    interval = m.merge(m.merge({}, step), later)  # the stats logger's interval

    assert interval["loaded_tokens"] == {"store": 448}
    assert interval["loaded_bytes"] == {"store": 448_000}
    assert interval["load_seconds"] == [0.02, 0.03, 0.01]
    assert interval["fetch"] == [[128_000, 0.02], [256_000, 0.03], [64_000, 0.01]]
    assert interval["plans"] == {"fetch": 1, "none": 1}
    assert interval["load_errors"] == {"damaged": 3}
    assert m.reduce(interval) == {
        "loaded_tokens.store": 448, "loaded_bytes.store": 448_000, "load_seconds.count": 3,
        "load_seconds.sum": 0.06, "load_errors.damaged": 3, "plans.none": 1, "plans.fetch": 1,
    }  # fmt: skip


def test_a_merge_shares_nothing_with_the_payload_it_read():
    # vLLM hands one payload to its logging and its Prometheus loggers, and the logging one adds
    # later payloads to what it built from this one: the payload must not change.
    payload = _worker_step(128, 0.02)
    accumulator = m.merge({}, payload)
    m.merge(accumulator, _worker_step(64, 0.01))
    m.count(accumulator, "loaded_tokens", 1, "store")
    assert payload == _worker_step(128, 0.02)


def test_empty_means_no_nonzero_count_and_no_sample():
    data: dict = {}
    assert m.is_empty(data)
    m.count(data, "loaded_tokens", 0, "store")  # a load that failed at its first block
    assert m.is_empty(data)
    m.observe(data, "save_seconds", 0.001)
    assert not m.is_empty(data)
    assert not m.is_empty({"forward": [[17, 2048, 0.9]]})  # the fetch plan needs it


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loaded_tokens", "disk", r"tier is one of \('node', 'store'\)"),
        ("plans", "maybe", r"plan is one of \('none', 'fetch', 'recompute', 'split'\)"),
        ("load_errors", "", "reason is one of"),
        ("saved_bytes", "store", r"label is one of \(''"),
        ("load_seconds", "", "load_seconds is a histogram"),
        ("loaded_token", "store", "unknown kvpool metric 'loaded_token'; known: loaded_tokens"),
    ],
)
def test_a_count_outside_the_fixed_label_values_is_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        m.count({}, key, 1, value)
    with pytest.raises(ValueError, match=message):  # what arrives from another process too
        m.merge({}, {key: {value: 1}})


def test_vllm_series_are_all_made_up_front_and_take_counts_by_engine_and_label():
    registry = CollectorRegistry()
    series = m.VllmSeries(
        functools.partial(Counter, registry=registry),
        functools.partial(Histogram, registry=registry),
        ENGINE_LABELS,
        ENGINES,
    )
    # Every series exists at 0 before any count, and there are no others: bounded label sets.
    families = {f.name: f for f in registry.collect()}
    assert set(families) == {m.VLLM_PREFIX + spec.key for spec in m.METRICS}
    for spec in m.METRICS:
        if spec.kind == m.COUNTER:
            samples = [s for s in families[m.VLLM_PREFIX + spec.key].samples
                       if s.name.endswith("_total")]  # fmt: skip
            assert len(samples) == len(ENGINES) * len(spec.label_values)
            assert {s.labels.get(spec.label, "") for s in samples} == set(spec.label_values)
            assert all(s.value == 0 for s in samples)

    data = _worker_step(1920, 0.2)
    m.count(data, "plans", 1, "fetch")
    m.count(data, "load_errors", 2, "unavailable")
    m.count(data, "saved_blocks", 5, "stored")
    m.count(data, "saved_bytes", 5000)
    series.observe(data, engine=1)
    series.observe(_worker_step(128, 7.0), engine=1)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model_name": "smollm2", "engine": "1", **labels})

    assert value("vllm:kvpool_loaded_tokens_total", tier="store") == 2048
    assert value("vllm:kvpool_loaded_tokens_total", tier="node") == 0
    assert value("vllm:kvpool_loaded_bytes_total", tier="store") == 2_048_000
    assert value("vllm:kvpool_plans_total", plan="fetch") == 1
    assert value("vllm:kvpool_load_errors_total", reason="unavailable") == 2
    assert value("vllm:kvpool_saved_blocks_total", outcome="stored") == 5
    assert value("vllm:kvpool_saved_bytes_total") == 5000
    assert value("vllm:kvpool_load_seconds_count") == 2
    assert value("vllm:kvpool_load_seconds_bucket", le="0.25") == 1
    assert value("vllm:kvpool_load_seconds_sum") == pytest.approx(7.2)
    # the fetch plan's samples are not metrics, and engine 0 saw nothing
    assert registry.get_sample_value(
        "vllm:kvpool_loaded_tokens_total", {"model_name": "smollm2", "engine": "0", "tier": "store"}
    ) == 0  # fmt: skip


def test_kvpools_own_metrics_serve_the_running_totals(free_port):
    totals = m.ConnectorTotals()
    first = _worker_step(1920, 0.25)  # at a bucket's bound: counted in that bucket
    m.count(first, "plans", 1, "split")
    totals.add(first)
    second = _worker_step(128, 20.0)  # past the last bound: +Inf only
    m.count(second, "load_errors", 1, "missing")
    totals.add(second)
    port = totals.serve("127.0.0.1", free_port())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        totals.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[m.OWN_PREFIX + name, tuple(sorted(labels.items()))]

    assert value("loaded_tokens_total", tier="store") == 2048
    assert value("loaded_tokens_total", tier="node") == 0
    assert value("plans_total", plan="split") == 1
    assert value("plans_total", plan="fetch") == 0
    assert value("load_errors_total", reason="missing") == 1
    assert value("load_seconds_bucket", le="0.1") == 0
    assert value("load_seconds_bucket", le="0.25") == 1
    assert value("load_seconds_bucket", le="10.0") == 1
    assert value("load_seconds_bucket", le="+Inf") == 2
    assert value("load_seconds_count") == 2
    assert value("load_seconds_sum") == pytest.approx(20.25)
    assert value("save_seconds_count") == 0
    assert totals.value("loaded_tokens", "store") == 2048 and totals.value("load_seconds") == 2
    assert not any(name.startswith("vllm:") for name, _ in samples)


@pytest.mark.parametrize("doc", ["docs/vllm.md", "docs/operations.md"])
def test_the_docs_list_every_metric_with_its_label_values(doc):
    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    for spec in m.METRICS:
        shown = m.VLLM_PREFIX + spec.key + ("_total" if spec.kind == m.COUNTER else "")
        assert f"`{shown}`" in text, shown
        for value in spec.values:
            assert f"`{value}`" in text, (shown, value)
