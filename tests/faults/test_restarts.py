"""Redis and the KVStore restarted under a running workload: requests keep succeeding with the
exact no-cache output, the outage shows in metrics, and caching comes back by itself."""

import threading
import time
from dataclasses import dataclass

import pytest

from kvpool.errors import KvpoolError, Unavailable
from tests.faults.support import gateway_metrics, metric, wait_for

pytestmark = pytest.mark.integration

DOCS = [
    f"Document {n}. Operators restart Redis for upgrades and it comes back empty, because a "
    "cache runs without persistence; the store must reconnect and the workers must recompute "
    "what was lost, without a single request failing along the way. " * 2
    for n in range(3)
]


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    doc: int
    token_ids: tuple[int, ...]
    cached_store: int
    error: str = ""


class Workload:
    """One client thread sending the documents round robin, bounded in count and time."""

    def __init__(self, client, max_requests: int = 120, max_seconds: float = 90.0) -> None:
        self._client = client
        self._max_requests, self._max_seconds = max_requests, max_seconds
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        for i in range(self._max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            doc = i % len(DOCS)
            started = time.monotonic()
            try:
                done = self._client.generate(prompt=DOCS[doc], max_new_tokens=6)
                outcome = Outcome(
                    started, time.monotonic(), doc, done.token_ids,
                    done.usage["cached_tokens_by_tier"]["store"],
                )  # fmt: skip
            except KvpoolError as exc:
                outcome = Outcome(started, time.monotonic(), doc, (), 0, str(exc))
            self.outcomes.append(outcome)

    def __enter__(self) -> "Workload":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def after(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.started >= t]


@pytest.fixture(scope="module")
def references(stack):
    """The no-cache greedy output of each document."""
    outputs = []
    for doc in DOCS:
        done = stack.client.generate(prompt=doc, max_new_tokens=6)
        assert done.usage["cached_tokens"] == 0
        outputs.append(done.token_ids)
    stack.flush()
    return outputs


def test_redis_restarted_mid_workload(stack, references):
    store = stack.store
    errors_before = metric(gateway_metrics(stack.gateway), "kvpool_worker_store_errors_total")
    with Workload(stack.client) as work:
        wait_for(lambda: sum(o.cached_store > 0 for o in work.outcomes) >= 3, 60, "store hits")

        stack.redis.stop()
        down_at = time.monotonic()
        wait_for(lambda: len(work.after(down_at)) >= 3, 60, "requests while Redis is down")
        during = store.metrics()
        stack.redis.start()  # same port, empty: no persistence
        up_at = time.monotonic()
        wait_for(
            lambda: sum(o.cached_store > 0 for o in work.after(up_at)) >= 3,
            60,
            "store hits after Redis came back",
        )
    outage = [o for o in work.outcomes if down_at <= o.started and o.finished <= up_at]

    assert [o.error for o in work.outcomes if o.error] == []
    for o in work.outcomes:
        assert o.token_ids == references[o.doc], "an output differs from the no-cache output"
    assert outage and all(o.cached_store == 0 for o in outage)  # recomputed, not failed
    # The outage is visible: the store answered UNAVAILABLE and said its backend was down,
    # and the workers counted the store reads they served as misses.
    assert metric(during, "kvpool_store_backend_up") == 0
    assert metric(during, "kvpool_store_requests_total", method="Lookup", code="UNAVAILABLE") > 0
    after = gateway_metrics(stack.gateway)
    assert metric(after, "kvpool_worker_store_errors_total") > errors_before
    assert metric(store.metrics(), "kvpool_store_backend_up") == 1


def test_store_killed_and_restarted(stack, references):
    client, store = stack.client, stack.store
    errors_before = metric(gateway_metrics(stack.gateway), "kvpool_worker_store_errors_total")
    warm = client.generate(prompt=DOCS[0], max_new_tokens=6)
    assert warm.usage["cached_tokens_by_tier"]["store"] > 0

    store.kill()  # SIGKILL: no graceful shutdown
    try:
        down = [client.generate(prompt=doc, max_new_tokens=6) for doc in DOCS]
        assert [d.token_ids for d in down] == references
        assert all(d.usage["cached_tokens"] == 0 for d in down)
        # Sessions live in the store: without it a session turn fails with a clear status.
        with pytest.raises(Unavailable, match="UNAVAILABLE"):
            client.generate(prompt="hi", max_new_tokens=2, session_id="during-outage")
        errors = metric(gateway_metrics(stack.gateway), "kvpool_worker_store_errors_total")
        assert errors >= errors_before + len(DOCS)
    finally:
        store.start()  # same port, same Redis: the blocks are still there

    restarted = time.monotonic()
    hits: list[float] = []

    def hit() -> bool:
        done = client.generate(prompt=DOCS[1], max_new_tokens=6)
        assert done.token_ids == references[1]
        if done.usage["cached_tokens_by_tier"]["store"] > 0:
            hits.append(time.monotonic() - restarted)
        return bool(hits)

    # The workers' channels reconnect on their own (backoff capped at 2 s).
    wait_for(hit, 30, "a store hit after the restart", interval_s=0.2)
    assert client.generate(prompt="hi", max_new_tokens=2, session_id="after-outage")
