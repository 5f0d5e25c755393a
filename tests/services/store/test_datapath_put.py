"""Put on the store's data path (docs/store.md, "The data path"): values move from the client's
socket to Redis as SETs (copied when small, spliced otherwise), or through the backend for the
memory backend. Real redis-server, real store servers on loopback ports, raw sockets where the
test plays a client that breaks off."""

import os
import socket
import struct
import time

import pytest
import redis

from kvpool.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.store import datawire as wire
from services.store.client import StoreClient
from services.store.dataserver import client_gone
from services.store.limits import StoreLimits
from services.store.server import StoreServer
from services.store.settings import StoreConfig

SIZES = [0, 1, 100, 70_000, 256 << 10, (256 << 10) + 1, 3 << 20]


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


def _puts(server: StoreServer, code: str = "OK") -> float:
    return server.metrics.requests.labels("Put", code)._value.get()


def _puts_since(server: StoreServer, before: float, expected: int, code: str = "OK") -> float:
    """Put calls counted since `before`, read once `expected` are (or 5 s passed): the store
    counts a call after its answer is sent."""
    deadline = time.monotonic() + 5
    while _puts(server, code) - before < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _puts(server, code) - before


def _frame(sock: socket.socket) -> tuple[int, bytes]:
    kind, length = wire.decode_frame(sock.recv(wire.FRAME.size, socket.MSG_WAITALL))
    body = sock.recv(length, socket.MSG_WAITALL) if length and kind != wire.OK else b""
    return kind, body


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_server):
    backend = redis_server if request.param == "redis" else "memory"
    with StoreServer(StoreConfig(backend=backend, port=0, grace_s=1)) as server:
        yield server


def test_a_put_goes_through_the_data_path_and_reads_back_the_same_by_grpc(store):
    values = {key(i): os.urandom(n) for i, n in enumerate(SIZES)}
    with StoreClient(store.target) as client, StoreClient(store.target, data_path=False) as grpc:
        before = _puts(store)
        assert client.put_many(list(values.items())) == len(values)
        assert client._data[0] is not None  # the data path took it, and stays on
        assert _puts_since(store, before, 1) == 1  # one call for every value
        assert grpc.get_many(list(values)) == values
        assert client.get_many(list(values)) == values
        assert client.put_many([(key(0), b"again")]) == 1  # a SET of a stored key replaces it
        assert grpc.get_many([key(0)]) == {key(0): b"again"}


def test_the_ttl_asked_for_or_the_stores_reaches_redis(redis_server):
    raw = redis.Redis.from_url(redis_server)
    config = StoreConfig(backend=redis_server, port=0, ttl_s=600)
    with StoreServer(config) as server, StoreClient(server.target) as client:
        client.put_many([(key(1), b"short"), (key(2), os.urandom(1 << 20))], ttl_s=30)
        client.put_many([(key(3), b"default")])
    assert 0 < raw.ttl(key(1)) <= 30 and 0 < raw.ttl(key(2)) <= 30
    assert 30 < raw.ttl(key(3)) <= 600  # the store's --ttl


def test_a_block_over_the_limit_is_refused_never_stored_in_part(redis_server):
    limits = StoreLimits(max_block_bytes=1 << 20)
    config = StoreConfig(backend=redis_server, port=0, limits=limits)
    with StoreServer(config) as server, StoreClient(server.target) as client:
        with pytest.raises(ResourceExhausted, match="--max-block-bytes"):
            client.put_many([(key(1), b"small"), (key(2), bytes((1 << 20) + 1))])
        with pytest.raises(InvalidArgument, match="keys are 1 to 200 characters"):
            client.put_many([("has space", b"v")])
        assert client.get_many([key(2)]) == {}  # never half a block
        assert client.put_many([(key(3), b"v")]) == 1  # the client and the store go on
        assert client._data[0] is not None
        assert client.get_many([key(3)]) == {key(3): b"v"}


@pytest.mark.parametrize("size", [70_000, 3 << 20])
def test_a_client_that_breaks_off_inside_a_value_stores_nothing_of_its_put(redis_server, size):
    raw = redis.Redis.from_url(redis_server)
    with StoreServer(StoreConfig(backend=redis_server, port=0)) as server:
        sock = socket.create_connection(("127.0.0.1", server.data_port), timeout=5)
        sock.sendall(wire.encode_hello(None))
        assert _frame(sock)[0] == wire.OK
        parts = wire.encode_put([(key(1), b"whole"), (key(2), bytes(size))], 10_000, 0)
        sock.sendall(b"".join(bytes(p) for p in parts)[: -size // 2])  # half the second value
        sock.close()
        with StoreClient(server.target) as client:
            assert _puts_since(server, 0, 1, "CANCELLED") == 1  # a call the client left
            # One transaction: half a SET dropped with its connection, and the whole SET
            # before it with it.
            assert raw.get(key(1)) is None and raw.get(key(2)) is None
            assert client.put_many([(key(2), b"later")]) == 1  # the store still takes Puts
            assert client.get_many([key(2)]) == {key(2): b"later"}


def test_a_client_gone_is_seen_even_before_its_request_is_read():
    """What keeps a Put read late (a store paused past its client's deadline) from being applied
    after its client gave up: the kernel's TCP state says the client closed, unread bytes or
    not. tests/faults/test_session_saves.py pauses a real store process for the whole case."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        assert not client_gone(conn)  # connected, nothing sent: waiting
        client.sendall(b"a request it will not wait for")
        assert not client_gone(conn)
        client.close()
        deadline = time.monotonic() + 5
        while not client_gone(conn) and time.monotonic() < deadline:
            time.sleep(0.01)  # the FIN arrives
        assert client_gone(conn)
        assert conn.recv(100) == b"a request it will not wait for"  # still unread until now
    finally:
        conn.close()
        listener.close()


def test_put_golden_bytes():
    """The put format docs/store.md describes, byte for byte (values are sent as given)."""
    value = memoryview(b"xyz")
    parts = wire.encode_put([("a", value)], 1500, 60)
    assert parts[0] == b"\x03" + struct.pack("<III", 1500, 1, 60)
    assert parts[1] == b"\x01a" + (3).to_bytes(4, "little")
    assert parts[2] is value
    with pytest.raises(wire.Unencodable):
        wire.encode_put([("k" * 256, b"v")], 1500, 0)


def test_an_open_circuit_sends_calls_to_grpc_whose_probe_closes_it(redis_server):
    """The data path never takes the circuit's probe: it would not report back, and a circuit
    whose probes are taken that way stays open for gRPC calls for good (faults/test_restarts
    found it: every Put a worker sent through gRPC failed fast while its data path worked)."""
    config = StoreConfig(backend=redis_server, port=0)
    with StoreServer(config) as server, StoreClient(server.target, timeout_s=2.0) as client:
        assert client.put_many([(key(1), b"v")]) == 1
        data = client._data[0]
        assert data is not None
        client.breaker.failure()
        client.breaker.failure()  # open: as after two calls the store did not answer
        with pytest.raises(Unavailable, match="circuit open"):
            client.put_many([(key(2), b"v")])  # fail fast, the data path not tried
        deadline = time.monotonic() + 10
        while client.breaker.is_open and time.monotonic() < deadline:
            try:
                client.put_many([(key(2), b"v")])  # after the cooldown: the gRPC probe
            except Unavailable:
                time.sleep(0.2)
        assert not client.breaker.is_open  # its answer closed the circuit
        assert client.put_many([(key(3), b"v")]) == 1
        assert client._data[0] is data  # and the data path carries the calls again
