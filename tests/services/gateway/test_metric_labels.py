"""Issue 14, item 11: the `tenant` label takes a bounded set of values, whatever tenants callers
name (one layer: the gateway's metrics, rendered as Prometheus would scrape them)."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.api import Usage
from services.gateway.metrics import MAX_TENANT_LABELS, OTHER_TENANT, GatewayMetrics
from workers.api import WorkUsage


def test_tenants_beyond_the_cap_share_one_label():
    metrics = GatewayMetrics()
    usage = Usage(
        WorkUsage(
            prompt_tokens=10, cached_local_tokens=0, cached_store_tokens=0, completion_tokens=2,
            ttft_ms=4.0, tokens_per_s=1.0, worker="w",
        ),
        ttft_ms=5.0, session_id="", failovers=0,
    )  # fmt: skip
    for n in range(10 * MAX_TENANT_LABELS):
        tenant = f"tenant-{n}"
        metrics.requests.labels(tenant).inc()
        metrics.observe_generate(usage, tenant)
    text = generate_latest(metrics.registry).decode()
    tenants = {
        sample.labels["tenant"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "tenant" in sample.labels
    }
    assert len(tenants) == MAX_TENANT_LABELS + 1
    assert OTHER_TENANT in tenants and "tenant-0" in tenants
    requests = {
        s.labels["tenant"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kvpool_gateway_requests_total"
    }
    assert requests[OTHER_TENANT] == 9 * MAX_TENANT_LABELS
