"""A small real stack for fuzzing requests: the KVStore (memory backend), a local Ray with one
tiny-random worker, and the gateway, all on loopback ports chosen here."""

import pytest

from services.store.server import StoreConfig, StoreServer
from tests.support.stack import gateway_over
from workers.api import WorkerConfig


@pytest.fixture(scope="package")
def gateway():
    store = StoreServer(StoreConfig(port=0, max_memory_bytes=64 << 20, grace_s=0))
    store.start()
    worker = WorkerConfig(
        model="tiny-random", codec="fp16", block_tokens=16, store_target=store.target
    )
    try:
        with gateway_over(store.target, worker, workers=1, grace_s=2) as server:
            yield server
    finally:
        store.stop(0)
