"""Calls open per caller, so that one caller's open calls cost that caller its own quota.

A caller is a key: `tenant:<name>` for a call whose bearer token acts for a tenant, `peer:<host>`
when auth is off (the request may name any tenant then, so its peer address is what counts). The
gRPC shell (`services.aio_server`) and the gateway's HTTP API share one `CallerQuota`, so a
tenant's calls count once across both fronts. No grpc here: the HTTP layer imports it.
"""

import threading

from kvpool import errors


class CallerQuota:
    """Open calls per caller, with a cap per caller and one for all; thread-safe.

    Callers are keys such as `tenant:acme` or `peer:10.0.0.7`; a key leaves the table when its
    last call ends, so the table is as large as the callers with calls open, never larger.
    """

    def __init__(self, per_caller: int, total: int = 0, flag: str = "--max-calls-per-tenant"):
        self.per_caller = per_caller
        self.total = total
        self.flag = flag
        self._open: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def enter(self, caller: str) -> None:
        """Count one more call of `caller`; ResourceExhausted, naming the limit, when full."""
        with self._lock:
            held = self._open.get(caller, 0)
            if self.per_caller and held >= self.per_caller:
                raise errors.ResourceExhausted(
                    f"{_shown(caller)} already has {held} calls open (limit "
                    f"{self.flag}={self.per_caller}); finish or cancel one first"
                )
            if self.total and self._count >= self.total:
                raise errors.ResourceExhausted(
                    f"the server has {self._count} calls open (limit {self.total}); retry later"
                )
            self._open[caller] = held + 1
            self._count += 1

    def leave(self, caller: str) -> None:
        with self._lock:
            held = self._open.get(caller, 0) - 1
            if held > 0:
                self._open[caller] = held
            else:
                self._open.pop(caller, None)
            self._count = max(0, self._count - 1)

    def open_calls(self, caller: str) -> int:
        with self._lock:
            return self._open.get(caller, 0)


def _shown(caller: str) -> str:
    kind, _, name = caller.partition(":")
    if kind == "tenant":
        return f"tenant {name!r}" if name else "the default tenant"
    return f"peer {name}"


def caller_key(tenant: str | None, host: str) -> str:
    """The quota key of a call: its token's tenant when auth is on, else its peer's address."""
    if tenant is not None:
        return f"tenant:{tenant}"
    return f"peer:{host}"
