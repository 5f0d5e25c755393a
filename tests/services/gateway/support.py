"""Helpers shared by the gateway's integration tests."""

import contextlib
import time

from services.gateway.server import GatewayServer

BLOCK_TOKENS = 16


@contextlib.contextmanager
def occupy(gateway: GatewayServer, worker_id: str):
    """Count one extra request in flight on `worker_id`, as a long generation there would.

    Routing weighs load against cached prefix; this steers the next request away from a worker
    without waiting on a real long generation (the policy itself is unit-tested).
    """
    others = frozenset(w for w in gateway.router.workers() if w != worker_id)
    held = gateway.router.acquire([], exclude=others)
    try:
        yield
    finally:
        gateway.router.release(held)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
