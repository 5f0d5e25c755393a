"""A Redis far too small for the working set (`maxmemory` + `allkeys-lru`, as docs/store.md says
to run it): Redis evicts, and neither store clients nor a worker ever see an error."""

import threading

import pytest
from prometheus_client import generate_latest

from services.store.client import StoreClient
from services.store.redis_process import RedisProcess
from services.store.server import StoreConfig, StoreServer
from tests.faults.support import metric
from tests.support.redis import require_redis_server
from workers.api import PromptInput, SamplingParams, WorkDone, WorkerConfig, WorkRequest
from workers.worker import KVWorker

pytestmark = pytest.mark.integration

MAXMEMORY = 4 << 20
VALUE_BYTES = 16 << 10


def _small_store(maxmemory: int):
    require_redis_server()
    with RedisProcess(maxmemory_bytes=maxmemory, policy="allkeys-lru") as redis:
        server = StoreServer(StoreConfig(backend=redis.url, port=0, grace_s=0))
        server.start()
        try:
            yield server
        finally:
            server.stop(0)


@pytest.fixture
def small_store():
    yield from _small_store(MAXMEMORY)


@pytest.fixture
def tiny_store():
    # An empty Redis 7 already uses about 0.95 MiB, so this leaves about 1 MiB for blocks.
    yield from _small_store(2 << 20)


def calls_by_code(server: StoreServer) -> dict[str, float]:
    text = generate_latest(server.metrics.registry).decode()
    codes = {}
    for code in ("OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DATA_LOSS"):
        codes[code] = metric(text, "kvpool_store_requests_total", code=code)
    return codes


def test_clients_see_no_errors_while_redis_evicts(small_store):
    errors: list[BaseException] = []

    def client_thread(n: int) -> None:
        try:
            with StoreClient(small_store.target, timeout_s=10) as client:
                for batch in range(12):  # 4 threads x 12 batches x 16 x 16 KiB = 12 MiB
                    keys = [f"kvpool:blk:t{n}-b{batch}-{i}" for i in range(16)]
                    value = bytes([n * 16 + batch]) * VALUE_BYTES
                    assert client.put_many([(k, value) for k in keys]) == len(keys)
                    present = client.lookup(keys)
                    found = client.get_many(keys)
                    assert all(found[k] == value for k in found)  # evicted keys are just absent
                    assert present <= len(keys)
        except BaseException as exc:  # collected and asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with StoreClient(small_store.target) as client:
        stats = client.stats()
    assert stats.capacity_bytes == MAXMEMORY
    assert stats.evictions and stats.evictions > 0
    assert stats.keys is not None and stats.keys * VALUE_BYTES < MAXMEMORY
    metrics = generate_latest(small_store.metrics.registry).decode()
    assert metric(metrics, "kvpool_store_evictions_total") == stats.evictions
    codes = calls_by_code(small_store)
    assert codes["OK"] > 0 and sum(codes.values()) == codes["OK"]


def test_a_worker_keeps_exact_outputs_while_its_blocks_are_evicted(tiny_store):
    small_store = tiny_store
    worker = KVWorker(
        WorkerConfig(
            model="tiny-random", codec="fp16", block_tokens=16,
            store_target=small_store.target, l1_bytes=0, fetch_plan="fetch",
        ),
        "squeezed",
    )  # fmt: skip
    try:
        params = SamplingParams(max_new_tokens=8)
        prompts = [
            tuple(
                worker.prompts.encode_input(
                    PromptInput(prompt=f"Eviction {n}. " + "Some filler text. " * 120)
                )
            )
            for n in range(8)
        ]
        # About 30 blocks of 4 KiB (fp16, tiny-random) per prompt, about 1 MiB in all, output
        # blocks on top: more than Redis keeps, so it evicts while the prompts come round again.
        evictions_before = _evictions(small_store)
        exact = [_run(worker, WorkRequest(p, params, read_cache=False)) for p in prompts]
        for _ in range(2):
            for prompt, reference in zip(prompts, exact, strict=True):
                assert _run(worker, WorkRequest(prompt, params)).token_ids == reference.token_ids
            assert worker.flush(60)
        stats = worker.stats()
        assert stats.store_errors == 0 and stats.corrupt_blocks == 0
        assert stats.writes.failed == 0 and stats.writes.stored > 0
        assert stats.cached_store_tokens > 0  # the store still served what it kept
        assert _evictions(small_store) > evictions_before
        codes = calls_by_code(small_store)
        assert sum(codes.values()) == codes["OK"]
    finally:
        worker.close()


def _run(worker: KVWorker, request: WorkRequest) -> WorkDone:
    done = list(worker.generate(request))[-1]
    assert isinstance(done, WorkDone)
    return done


def _evictions(server: StoreServer) -> int:
    with StoreClient(server.target) as client:
        return client.stats().evictions or 0
