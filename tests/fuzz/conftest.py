"""A small real stack for fuzzing requests: the KVStore (memory backend), a local Ray with one
tiny-random worker, and the gateway, all on loopback ports chosen here."""

import pytest

from services.stack import local_stack
from services.store.server import StoreConfig
from workers.api import WorkerConfig


@pytest.fixture(scope="package")
def gateway():
    store = StoreConfig(port=0, max_memory_bytes=64 << 20, grace_s=0)
    worker = WorkerConfig(model="tiny-random", codec="fp16", block_tokens=16)
    with local_stack(worker, workers=1, store=store, grace_s=2) as stack:
        yield stack.gateway
