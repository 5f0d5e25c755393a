"""The KVStore end to end: a real gRPC server on loopback, over a real redis-server."""

import os
import socket
import threading
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from kvpool.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from kvpool.v1 import store_pb2, store_pb2_grpc
from services.auth import TokenTable
from services.store.client import StoreClient
from services.store.server import StoreConfig, StoreServer
from services.store.service import StoreLimits

pytestmark = pytest.mark.integration

BLOCK = "kvpool:blk:" + "0" * 64


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


@pytest.fixture
def serve():
    """Start StoreServers on free ports; all are stopped after the test."""
    servers = []

    def start(**config) -> StoreServer:
        server = StoreServer(StoreConfig(port=0, grace_s=1, **config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0)


@pytest.fixture
def store(serve, redis_server):
    server = serve(backend=redis_server)
    with StoreClient(server.target, timeout_s=5) as client:
        yield client


def test_round_trip_over_redis(store):
    values = {key(i): os.urandom(n) for i, n in enumerate([0, 1, 70_000, 1 << 20, 3_000_001])}
    assert store.put_many(list(values.items())) == 5
    assert store.lookup([*values, key(99), key(0)]) == 5
    assert store.lookup([key(99), *values]) == 0
    assert store.get_many([key(99), *values]) == values
    assert store.delete([key(0), key(99)]) == 1
    assert store.lookup(list(values)) == 0
    stats = store.stats()
    assert stats.backend.startswith("redis://127.0.0.1:")
    assert (stats.hits, stats.misses, stats.puts, stats.keys) == (5, 1, 5, 4)
    assert stats.evictions == 0


def test_session_metadata_keys_share_the_same_api(store):
    assert store.put_many([("kvpool:sess:user-1.turns", b'{"tokens": [1, 2]}')]) == 1
    assert store.get_many(["kvpool:sess:user-1.turns"]) == {
        "kvpool:sess:user-1.turns": b'{"tokens": [1, 2]}'
    }


def test_memory_backend_through_the_service(serve):
    server = serve(backend="memory", max_memory_bytes=10_000)
    with StoreClient(server.target) as client:
        client.put_many([(key(i), b"x" * 3000) for i in range(5)])
        stats = client.stats()
    assert stats.backend == "memory" and stats.capacity_bytes == 10_000
    assert stats.keys == 3 and stats.evictions == 2


def test_a_reader_never_sees_part_of_a_block(store):
    """Writers replace a 3 MiB block (three stream pieces) while a reader reads it."""
    size = 3 << 20
    versions = (b"A" * size, b"B" * size)
    store.put_many([(BLOCK, versions[0])])
    stop = threading.Event()
    seen: list[bytes] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.put_many([(BLOCK, versions[n % 2])])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 2
        while (time.monotonic() < deadline and len({v[:1] for v in seen}) < 2) or len(seen) < 20:
            seen.append(store.get_many([BLOCK])[BLOCK])
    finally:
        stop.set()
        writer.join()
    assert all(value in versions for value in seen)
    assert {value[:1] for value in seen} == {b"A", b"B"}  # the race was really exercised


def test_ttl_from_the_request_and_the_server_default(serve, redis_server):
    server = serve(backend=redis_server, ttl_s=300)
    raw = redis.Redis.from_url(redis_server)
    with StoreClient(server.target) as client:
        client.put_many([(key(1), b"short")], ttl_s=1)
        client.put_many([(key(2), b"default")])
        assert client.lookup([key(1)]) == 1
        assert 295 <= raw.ttl(key(2)) <= 300
        time.sleep(1.1)
        assert client.lookup([key(1)]) == 0
        assert client.get_many([key(1)]) == {}


@pytest.mark.parametrize("bad", ["has space", "", "k" * 201, "kvpool/blk", "ключ"])
def test_malformed_keys_are_invalid_argument_with_the_rule(store, bad):
    with pytest.raises(InvalidArgument, match="keys are 1 to 200 characters from A-Z a-z 0-9"):
        store.lookup([key(1), bad])
    with pytest.raises(InvalidArgument, match="keys are 1 to 200 characters"):
        store.get_many([bad])
    with pytest.raises(InvalidArgument, match="keys are 1 to 200 characters"):
        store.put_many([(bad, b"v")])


def test_status_codes_on_the_wire(serve, redis_server):
    server = serve(backend=redis_server, limits=StoreLimits(max_block_bytes=1000, max_keys=8))
    with grpc.insecure_channel(server.target) as channel:
        stub = store_pb2_grpc.KVStoreStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(store_pb2.LookupRequest(keys=["bad key"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(store_pb2.LookupRequest(keys=["k"] * 9))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 8" in err.value.details()
        # A client using the generated (protobuf) stub interoperates with the framed stream.
        piece = store_pb2.BlockPiece(key="k", size=3, data=b"abc", last=True)
        reply = stub.Put(iter([store_pb2.PutChunk(pieces=[piece])]))
        assert reply.stored == 1
        (chunk,) = stub.Get(store_pb2.GetRequest(keys=["k", "nope"]))
        assert [(p.index, p.data, p.missing) for p in chunk.pieces] == [
            (0, b"abc", False),
            (1, b"", True),
        ]


def test_oversized_block_is_resource_exhausted_naming_the_limit(serve, redis_server):
    server = serve(backend=redis_server, limits=StoreLimits(max_block_bytes=1 << 20))
    with StoreClient(server.target) as client:
        with pytest.raises(ResourceExhausted, match=r"the limit is 1048576 bytes"):
            client.put_many([(key(1), b"x" * (3 << 20))])
        assert client.put_many([(key(2), b"x" * (1 << 20))]) == 1


def test_redis_outage_is_unavailable_then_recovers_without_restarting_the_store(
    serve, redis_process
):
    server = serve(backend=redis_process.url)
    with StoreClient(server.target, timeout_s=5, retries=2, backoff_s=0.05) as client:
        client.put_many([(key(1), b"v")])
        redis_process.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            client.get_many([key(1)])
        assert time.monotonic() - started < 5  # quick enough to be treated as a miss
        message = str(err.value)
        assert "UNAVAILABLE" in message
        assert f"Redis at redis://127.0.0.1:{redis_process.port}/0 is unreachable" in message
        with pytest.raises(Unavailable):
            client.lookup([key(1)])
        assert _health(server.target, "kvpool.v1.KVStore") == health_pb2.HealthCheckResponse.SERVING

        redis_process.start()  # same port; empty, as a cache without persistence would be
        assert client.lookup([key(1)]) == 0
        assert client.put_many([(key(1), b"again")]) == 1
        assert client.get_many([key(1)]) == {key(1): b"again"}


def test_client_retries_cover_a_store_that_starts_late(free_port):
    port = free_port()
    late = StoreServer(StoreConfig(port=port, grace_s=0))
    timer = threading.Timer(0.3, late.start)
    timer.start()
    try:
        with StoreClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1) as client:
            assert client.lookup([key(1)]) == 0
    finally:
        timer.join()
        late.stop(0)
    assert late.port == port


def test_client_gives_up_with_unavailable_when_nothing_listens(free_port):
    client = StoreClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)
    with client, pytest.raises(Unavailable, match=r"store Lookup at 127\.0\.0\.1:\d+: UNAVAILABLE"):
        client.lookup([key(1)])


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_and_reflection(serve):
    server = serve()
    assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.target, "kvpool.v1.KVStore") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"kvpool.v1.KVStore", "grpc.health.v1.Health"} <= set(services)


def test_bearer_token(serve):
    server = serve(auth=TokenTable({"t0ken": ""}))
    with StoreClient(server.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.lookup([key(1)])
    with StoreClient(server.target, auth_token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.get_many([key(1)])
    refused = pytest.raises(Unauthenticated, match="bearer token not accepted")
    with StoreClient(server.target, auth_token="wrong") as wrong, refused:  # client-streaming
        wrong.put_many([(key(1), b"v")])
    with StoreClient(server.target, auth_token="t0ken") as client:
        assert client.put_many([(key(1), b"v")]) == 1
    assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING  # no token


def test_metrics_answer_before_grpc_serves(redis_server, free_port, monkeypatch):
    """Issue 23: a caller that waits for health SERVING and then scrapes (a test, a readiness
    probe) found /metrics refusing the connection on a loaded machine, because it was bound
    after gRPC. Now it is bound first."""
    server = StoreServer(StoreConfig(port=0, grace_s=1, backend=redis_server,
                                     metrics_port=free_port()))  # fmt: skip
    scraped_at_grpc_start = []
    grpc_start = server._grpc.start

    def start_grpc() -> int:
        url = f"http://127.0.0.1:{server.config.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                scraped_at_grpc_start.append(response.status)
        except OSError as exc:
            scraped_at_grpc_start.append(repr(exc))
        return grpc_start()

    monkeypatch.setattr(server._grpc, "start", start_grpc)
    server.start()
    try:
        assert scraped_at_grpc_start == [200]
        url = f"http://127.0.0.1:{server.metrics.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "kvpool_store_processes 1.0" in text  # what a waiter reads, as with --processes
    finally:
        server.stop(0)


def test_a_store_that_cannot_bind_grpc_leaves_no_metrics_port(redis_server, free_port):
    with StoreServer(StoreConfig(port=0, grace_s=1, backend=redis_server)) as taken:
        metrics_port = free_port()
        server = StoreServer(StoreConfig(port=taken.port, grace_s=1, backend=redis_server,
                                         metrics_port=metrics_port))  # fmt: skip
        with pytest.raises(Unavailable, match="cannot listen"):
            server.start()
        server.stop(0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", metrics_port))  # free again


def test_prometheus_metrics(serve, redis_server, free_port):
    server = serve(backend=redis_server, metrics_port=free_port())
    with StoreClient(server.target) as client:
        client.put_many([(key(1), b"x" * 1000)])
        client.get_many([key(1), key(2)])
        client.lookup([key(1), key(2), key(3)])
        with pytest.raises(InvalidArgument):
            client.lookup(["bad key"])
    url = f"http://127.0.0.1:{server.metrics.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    expected = [
        'kvpool_store_requests_total{code="OK",method="Put"} 1.0',
        'kvpool_store_requests_total{code="INVALID_ARGUMENT",method="Lookup"} 1.0',
        'kvpool_store_request_seconds_count{method="Get"} 1.0',
        "kvpool_store_received_bytes_total 1000.0",
        "kvpool_store_sent_bytes_total 1000.0",
        'kvpool_store_hits_total{method="Get"} 1.0',
        'kvpool_store_misses_total{method="Get"} 1.0',
        'kvpool_store_hits_total{method="Lookup"} 1.0',
        'kvpool_store_misses_total{method="Lookup"} 2.0',
        "kvpool_store_puts_total 1.0",
        "kvpool_store_backend_up 1.0",
        "kvpool_store_backend_keys 1.0",
        "kvpool_store_evictions_total 0.0",
    ]
    for line in expected:
        assert line in text, line


def test_a_ttl_redis_would_refuse_is_invalid_argument_not_unavailable(serve, redis_server):
    """Issue 14: Redis' "invalid expire time" came back as UNAVAILABLE and was retried."""
    server = serve(backend=redis_server)
    with StoreClient(server.target, timeout_s=5) as client:
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match=r"ttl_s \d+ is too long"):
            client.put_many([(key(1), b"v")], ttl_s=2**62)
        assert time.monotonic() - started < 1  # answered, not retried
        assert client.lookup([key(1)]) == 0


def test_a_redis_acl_refusal_is_permission_denied_not_retried(serve, redis_process):
    """Issue 14: NOPERM came back as UNAVAILABLE, so clients retried a call that cannot work."""
    admin = redis.Redis.from_url(redis_process.url)
    admin.execute_command("ACL", "SETUSER", "narrow", "on", ">pw", "~other:*", "-@all", "+ping")
    admin.close()
    url = redis_process.url.replace("redis://", "redis://narrow:pw@")
    server = serve(backend=url)
    client = StoreClient(server.target, timeout_s=5, retries=3)
    with client, pytest.raises(PermissionDenied, match="NOPERM"):
        client.lookup([key(1)])
    assert (
        server.metrics.registry.get_sample_value(
            "kvpool_store_requests_total", {"method": "Lookup", "code": "PERMISSION_DENIED"}
        )
        == 1  # one call: not retried
    )
