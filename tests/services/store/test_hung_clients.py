"""Issue 14, item 9: slow or idle clients cannot hold the store's handler threads.

A real KVStore on loopback with 4 handler threads. A hostile client opens Get streams of large
values that it never reads, and Put streams that stop sending mid-block, enough to occupy every
thread. Another client must still be served, and the idle streams end on the server's side.
"""

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from kvpool.errors import ResourceExhausted
from kvpool.v1 import store_pb2
from services.store.chunks import SERVICE_NAME
from services.store.client import StoreClient
from services.store.framing import Piece, encode_put_chunk
from services.store.server import StoreConfig, StoreServer
from services.store.service import StoreLimits

pytestmark = pytest.mark.integration

MiB = 1 << 20
IDLE_S = 1.0


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


@pytest.fixture
def store():
    limits = StoreLimits(idle_s=IDLE_S, max_call_s=30, max_queued_rpcs=4)
    server = StoreServer(
        StoreConfig(port=0, grace_s=0, max_workers=4, max_memory_bytes=256 * MiB, limits=limits)
    )
    server.start()
    with StoreClient(server.target, timeout_s=10) as client:
        client.put_many([(key(i), bytes(4 * MiB)) for i in range(8)])
    yield server
    server.stop(0)


def _stalled_put(release: threading.Event) -> Iterator[bytes]:
    """The first piece of a 2 MiB block, then nothing until `release`."""
    yield encode_put_chunk(0, [Piece(key=key(99), data=b"x" * 1024, size=2 * MiB)])
    release.wait(60)


def test_idle_streams_do_not_starve_other_clients(store):
    channel = grpc.insecure_channel(store.target)
    get = channel.unary_stream(
        f"/{SERVICE_NAME}/Get", request_serializer=store_pb2.GetRequest.SerializeToString
    )
    put = channel.stream_unary(
        f"/{SERVICE_NAME}/Put", response_deserializer=store_pb2.PutResponse.FromString
    )
    release = threading.Event()
    try:
        # No deadlines: only the server can end these. 2 unread Gets + 2 stalled Puts hold all
        # 4 handler threads.
        hung = [get(store_pb2.GetRequest(keys=[key(i) for i in range(8)])) for _ in range(2)]
        hung += [put.future(_stalled_put(release)) for _ in range(2)]
        time.sleep(0.3)
        started = time.monotonic()
        with StoreClient(store.target, timeout_s=10) as good:
            assert good.lookup([key(0), key(1)]) == 2
            assert good.get_many([key(2)]) == {key(2): bytes(4 * MiB)}
        assert time.monotonic() - started < IDLE_S + 3.0
        # The hostile calls were ended by the server (an unread Get's client never hears it).
        for call in hung[2:]:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=10)

        def ended(method: str, code: str) -> float:
            labels = {"method": method, "code": code}
            return store.metrics.registry.get_sample_value("kvpool_store_requests_total", labels)

        deadline = time.monotonic() + 10
        while (ended("Get", "CANCELLED") or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ended("Get", "CANCELLED") == 2
    finally:
        release.set()
        for call in hung:
            call.cancel()
        channel.close()


def test_calls_beyond_the_queue_are_refused_at_once(store):
    """4 threads + 4 queued: the ninth call at once gets RESOURCE_EXHAUSTED, not a wait."""
    channel = grpc.insecure_channel(store.target)
    put = channel.stream_unary(
        f"/{SERVICE_NAME}/Put", response_deserializer=store_pb2.PutResponse.FromString
    )
    release = threading.Event()
    try:
        held = [put.future(_stalled_put(release)) for _ in range(8)]
        time.sleep(0.3)
        started = time.monotonic()
        with (
            StoreClient(store.target, timeout_s=5, retries=0) as extra,
            pytest.raises(ResourceExhausted),
        ):
            extra.lookup([key(0)])
        assert time.monotonic() - started < 0.5
        for call in held:
            call.cancel()
    finally:
        release.set()
        channel.close()


def test_a_call_without_a_deadline_ends_at_the_servers_limit():
    limits = StoreLimits(max_call_s=1.0, idle_s=0)
    server = StoreServer(StoreConfig(port=0, grace_s=0, limits=limits))
    server.start()
    channel = grpc.insecure_channel(server.target)
    put = channel.stream_unary(
        f"/{SERVICE_NAME}/Put", response_deserializer=store_pb2.PutResponse.FromString
    )
    release = threading.Event()
    try:
        started = time.monotonic()
        call = put.future(_stalled_put(release))  # no deadline, never finishes its block
        with pytest.raises(grpc.RpcError):
            call.result(timeout=15)
        assert time.monotonic() - started < 1.0 + 1.0 + 1.5  # the cap, the backstop, slack
    finally:
        release.set()
        channel.close()
        server.stop(0)
