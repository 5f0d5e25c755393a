"""Helpers shared by the gateway's integration tests."""

import contextlib
import time

from services.gateway.server import GatewayServer

BLOCK_TOKENS = 16


@contextlib.contextmanager
def drained(gateway: GatewayServer, worker_id: str):
    """Keep new requests off `worker_id`, so the next one runs on another worker."""
    router = gateway.pool.router
    router.set_draining(worker_id)
    try:
        yield
    finally:
        router.set_draining(worker_id, False)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
