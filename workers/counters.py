"""A worker's request counters, whatever its engine: the part of `WorkerStats` both engines count.

`KVWorker` (transformers) and `VLLMWorker` count the same things per request (requests, tokens
by tier, plans) under one lock; each adds what only its engine knows (L1, write-behind, batch
occupancy) when it builds its `WorkerStats`.
"""

import threading
from typing import Any

from workers.api import PLAN_KINDS


class RequestCounters:
    """Thread-safe totals since the worker started: `count(requests=1, ...)`, `plan("fetch")`."""

    FIELDS = (
        "requests",
        "in_flight",
        "cached_local_tokens",
        "cached_node_tokens",
        "cached_store_tokens",
        "computed_tokens",
        "recomputed_tokens",
        "corrupt_blocks",
        "node_errors",
        "store_errors",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(self.FIELDS, 0)
        self._plans = dict.fromkeys(PLAN_KINDS, 0)

    def count(self, plan: str | None = None, **deltas: int) -> None:
        """Add `deltas` (names from FIELDS) and, when given, one request to `plan`'s count."""
        unknown = set(deltas) - set(self.FIELDS)
        if unknown or (plan is not None and plan not in self._plans):
            raise ValueError(f"unknown counters {sorted(unknown)} or plan {plan!r}")
        with self._lock:
            for name, delta in deltas.items():
                self._totals[name] += delta
            if plan is not None:
                self._plans[plan] += 1

    def snapshot(self) -> dict[str, Any]:
        """The totals as `WorkerStats` keyword arguments (with `plans`), read at one instant."""
        with self._lock:
            return {**self._totals, "plans": dict(self._plans)}
