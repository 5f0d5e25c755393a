"""RequestCounters: the totals both engines' workers report, counted from many threads."""

import threading

import pytest

from workers.api import PLAN_KINDS
from workers.counters import RequestCounters


def test_counts_from_many_threads_add_up_and_plans_are_counted_by_kind():
    counters = RequestCounters()

    def serve() -> None:
        for _ in range(500):
            counters.count(requests=1, in_flight=1)
            counters.count(in_flight=-1, cached_store_tokens=64, plan="fetch")

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = counters.snapshot()
    assert snap["requests"] == 2000 and snap["in_flight"] == 0
    assert snap["cached_store_tokens"] == 2000 * 64
    assert snap["plans"] == {**dict.fromkeys(PLAN_KINDS, 0), "fetch": 2000}


def test_an_unknown_counter_or_plan_is_refused_and_counts_nothing():
    counters = RequestCounters()
    with pytest.raises(ValueError, match="unknown counters"):
        counters.count(requets=1)
    with pytest.raises(ValueError, match="plan 'guess'"):
        counters.count(requests=1, plan="guess")
    assert counters.snapshot()["requests"] == 0


def test_a_snapshot_is_a_copy():
    counters = RequestCounters()
    snap = counters.snapshot()
    snap["plans"]["none"] = 99
    counters.count(plan="none")
    assert counters.snapshot()["plans"]["none"] == 1
