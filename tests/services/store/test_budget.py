"""The byte budget and the circuit breaker, one layer at a time (no network)."""

import threading
import time

import pytest

from kvpool.errors import ResourceExhausted, Unavailable
from services.store.breaker import Breaker
from services.store.budget import ByteBudget


def test_budget_refuses_what_does_not_fit_and_waits_until_its_deadline():
    budget = ByteBudget(100)
    assert budget.try_acquire(60)
    assert not budget.try_acquire(50)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match="60 of 100 bytes in flight"):
        budget.acquire(50, time.monotonic() + 0.2)
    assert 0.15 <= time.monotonic() - started < 2
    threading.Timer(0.1, budget.release, args=(60,)).start()
    budget.acquire(50, time.monotonic() + 5)  # woken by the release
    assert budget.used == 50 and budget.peak == 60


def test_budget_refuses_a_piece_larger_than_itself_at_once():
    with pytest.raises(ResourceExhausted, match="--max-inflight-bytes"):
        ByteBudget(100).acquire(101, time.monotonic() + 10)


def test_breaker_opens_after_threshold_failures_and_lets_one_probe_per_cooldown():
    now = [0.0]
    breaker = Breaker("redis", threshold=2, cooldown_s=1.0, clock=lambda: now[0])
    breaker.failure()
    breaker.check()  # one failure: still closed
    breaker.failure()
    assert breaker.is_open
    with pytest.raises(Unavailable, match="circuit open"):
        breaker.check()
    now[0] = 1.5
    breaker.check()  # the probe
    with pytest.raises(Unavailable):
        breaker.check()  # the others still fail fast while it runs
    breaker.success()
    assert not breaker.is_open
    breaker.check()


def test_an_open_breaker_says_when_to_retry_and_reports_its_state():
    now = [0.0]
    changes: list[bool] = []
    breaker = Breaker("redis", threshold=2, cooldown_s=1.0, clock=lambda: now[0])
    breaker.on_change = changes.append
    breaker.failure()
    assert changes == []
    breaker.failure()  # opens
    now[0] = 0.25
    with pytest.raises(Unavailable) as refused:
        breaker.check()
    assert refused.value.retry_after_s == pytest.approx(0.75)  # the rest of the cooldown
    breaker.failure()  # already open: no second report
    breaker.success()
    assert changes == [True, False]
