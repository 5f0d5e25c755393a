"""Each tenant's share of the workers' request slots, so that one tenant never holds them all.

The pool runs `--max-requests-per-worker` requests per worker at once (its slots); past that,
requests wait in the router's queue. Without shares one tenant's long or unread streams could
hold every slot, and another tenant's request waited in the queue until one ended. A tenant may
hold at most `limit` slots, counting its requests at workers and its requests in the router's
queue; beyond that its requests wait here, behind its own, for at most the queue timeout, then
get RESOURCE_EXHAUSTED naming the limit.

The limit is `--max-requests-per-tenant`, or by default, when the gateway serves more than one
tenant (a token file naming them), the pool's slots less a quarter of them (at least one), so a
tenant runs nearly the whole pool and another tenant always finds a free slot: with two workers
of eight slots, 12 and 4. A gateway of one tenant, or with auth off (where every request names
its own tenant, and a share could be escaped by naming another), has no default share: its
batches fill as before.
"""

import threading
import time
from collections.abc import Callable

from kvpool.errors import ResourceExhausted, Unavailable

_POLL_S = 0.5  # how often a waiter looks at its client's cancellation


def default_limit(slots: int) -> int:
    """A tenant's share of `slots` when none is configured: all but a quarter, at least one."""
    if slots <= 0:
        return 0  # an unbounded pool: nothing to share
    return max(1, slots - max(1, slots // 4))


class TenantShares:
    """Slots held per tenant, with a cap per tenant; thread-safe."""

    def __init__(
        self,
        slots: Callable[[], int],
        per_tenant: int = 0,
        timeout_s: float = 60.0,
        *,
        reserve: bool = True,
    ) -> None:
        if per_tenant < 0 or timeout_s < 0:
            raise ValueError(
                f"per_tenant and timeout_s must be >= 0, got {per_tenant} and {timeout_s}"
            )
        self._slots = slots
        self._per_tenant = per_tenant
        self._reserve = reserve  # apply default_limit when no per_tenant is given
        self._timeout_s = timeout_s
        self._held: dict[str, int] = {}  # tenant -> slots held; absent at 0
        self._lock = threading.Condition()

    @property
    def limit(self) -> int:
        """The slots one tenant may hold now (0: no limit)."""
        if self._per_tenant:
            return self._per_tenant
        return default_limit(self._slots()) if self._reserve else 0

    def held(self, tenant: str) -> int:
        with self._lock:
            return self._held.get(tenant, 0)

    def acquire(self, tenant: str, cancelled: threading.Event | None = None) -> None:
        """Take a slot of `tenant`'s share, waiting for one of its own to free up."""
        deadline = time.monotonic() + self._timeout_s
        with self._lock:
            while True:
                limit = self.limit
                held = self._held.get(tenant, 0)
                if not limit or held < limit:
                    self._held[tenant] = held + 1
                    return
                if cancelled is not None and cancelled.is_set():
                    raise Unavailable("the call was cancelled while it waited for a worker")
                left = deadline - time.monotonic()
                if left <= 0:
                    whose = f"tenant {tenant!r}" if tenant else "the default tenant"
                    raise ResourceExhausted(
                        f"{whose} already runs {held} requests (limit "
                        f"--max-requests-per-tenant={limit}) and none ended within "
                        f"{self._timeout_s:g} s (--queue-timeout); retry later"
                    )
                self._lock.wait(min(left, _POLL_S))

    def release(self, tenant: str) -> None:
        with self._lock:
            held = self._held.get(tenant, 0) - 1
            if held > 0:
                self._held[tenant] = held
            else:
                self._held.pop(tenant, None)
            self._lock.notify_all()
