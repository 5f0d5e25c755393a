"""Prometheus metrics of the HTTP API, on the gateway's registry (listed in docs/gateway.md).

Every label value comes from a fixed set, whatever a client sends: `route` is a route template
of the app (or "unmatched"), `method` one of the HTTP methods below (or "other"), `status` the
status code the app answered.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"
# A request spans a 404 (sub-millisecond) to a whole generation on a CPU (a minute or more).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvpool_gateway_http_requests",
            "Finished HTTP requests by route template, method and status code.",
            ["route", "method", "status"], registry=registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "kvpool_gateway_http_request_seconds",
            "HTTP request duration, a whole streamed response included.",
            ["route"], registry=registry, buckets=_BUCKETS,
        )  # fmt: skip
        self.disconnects = Counter(
            "kvpool_gateway_http_disconnects",
            "Completions whose client went away before the end; each cancels its generation.",
            ["route"], registry=registry,
        )  # fmt: skip

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route).observe(seconds)
