"""Each tenant's share of the workers' slots (services.gateway.shares), without servers."""

import threading
import time

import pytest

from kvpool.errors import ResourceExhausted, Unavailable
from services.gateway.shares import TenantShares, default_limit


def test_the_default_share_leaves_a_quarter_of_the_slots_to_others():
    assert [default_limit(n) for n in (0, 1, 2, 4, 8, 16, 64)] == [0, 1, 1, 3, 6, 12, 48]


def test_one_tenant_waits_behind_its_own_and_never_takes_the_last_slots():
    shares = TenantShares(lambda: 16, timeout_s=0.2)
    for _ in range(12):
        shares.acquire("mallory")
    with pytest.raises(ResourceExhausted, match="--max-requests-per-tenant=12"):
        shares.acquire("mallory")  # waited its 0.2 s queue timeout, then refused
    shares.acquire("alice")  # another tenant's request is not held up
    shares.release("mallory")
    shares.acquire("mallory")  # room in her own share again
    assert (shares.held("mallory"), shares.held("alice")) == (12, 1)


def test_a_waiter_takes_a_slot_as_soon_as_its_tenant_releases_one():
    shares = TenantShares(lambda: 4, timeout_s=10)
    for _ in range(3):
        shares.acquire("t")
    took: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        shares.acquire("t")
        took.append(time.monotonic() - started)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    shares.release("t")
    waiter.join(5)
    assert took and took[0] < 1.0


def test_a_cancelled_waiter_gives_up():
    shares = TenantShares(lambda: 4, timeout_s=10)
    for _ in range(3):
        shares.acquire("t")
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Unavailable, match="cancelled"):
        shares.acquire("t", cancelled)


def test_a_gateway_of_one_tenant_keeps_every_slot():
    """With one tenant (or auth off) there is no one to reserve slots for: batches fill."""
    shares = TenantShares(lambda: 16, reserve=False)
    for _ in range(16):
        shares.acquire("")
    assert shares.limit == 0 and shares.held("") == 16
    explicit = TenantShares(lambda: 16, per_tenant=2, reserve=False, timeout_s=0)
    explicit.acquire("")
    explicit.acquire("")
    with pytest.raises(ResourceExhausted):
        explicit.acquire("")
