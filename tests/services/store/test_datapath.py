"""The store's data path (docs/store.md, "The data path"): real redis-server, real store servers on
loopback ports, and raw sockets where the test plays a broken client or a broken store."""

import functools
import os
import socket
import struct
import threading
import time

import pytest
import redis

from kvpool.errors import InvalidArgument
from services.auth import TokenTable
from services.store import datawire as wire
from services.store.client import StoreClient
from services.store.dataclient import DataPath
from services.store.limits import StoreLimits
from services.store.server import StoreServer
from services.store.settings import StoreConfig

TOKEN = "t" * 32
# docs/store.md's least-privilege Redis user (test_redis_backend.py checks it for redis-py).
ACL_RULE = (
    "on >pw ~kvpool:* resetchannels -@all +get +mget +set +exists +del +dbsize +info +ping"
    " +strlen +evalsha +script|load +multi +exec +discard"
)


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_server):
    backend = redis_server if request.param == "redis" else "memory"
    server = StoreServer(StoreConfig(backend=backend, port=0, grace_s=1))
    server.start()
    yield server
    server.stop(0)


def _hello(port: int, token: str | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(wire.encode_hello(token))
    return sock


def _frame(sock: socket.socket) -> tuple[int, bytes]:
    kind, length = wire.decode_frame(sock.recv(wire.FRAME.size, socket.MSG_WAITALL))
    body = sock.recv(length, socket.MSG_WAITALL) if length and kind != wire.OK else b""
    return kind, body if kind != wire.OK else length.to_bytes(8, "little")


def test_get_and_lookup_go_through_the_data_path_and_match_grpc(store):
    # Up to 256 KiB a value is copied through the store, above it spliced: both sides of that.
    sizes = [0, 1, 100, 70_000, 256 << 10, (256 << 10) + 1, 3 << 20]
    values = {key(i): os.urandom(n) for i, n in enumerate(sizes)}
    with StoreClient(store.target) as client, StoreClient(store.target, data_path=False) as grpc:
        client.put_many(list(values.items()))
        asked = [*values, key(99)]
        got = client.get_many(asked)
        assert got == values and list(got) == list(values)
        assert client._data[0] is not None  # it was the data path that answered
        assert grpc.get_many(asked) == got
        assert list(client.get_iter(asked)) == [(k, values.get(k)) for k in asked]
        assert client.lookup([key(0), key(1), key(99), key(2)]) == 2
        assert client.stats().hits >= 3 * len(sizes)


def test_the_store_advertises_its_data_port_and_none_with_tls_or_when_off(redis_server):
    with StoreServer(StoreConfig(backend=redis_server, port=0, data_port=-1)) as off:
        assert off.data_port is None
        with StoreClient(off.target) as client:
            client.put_many([(key(1), b"v")])
            assert client.get_many([key(1)]) == {key(1): b"v"}  # gRPC
            assert client._data[0] is None


def test_auth_is_refused_without_the_token(redis_server):
    config = StoreConfig(backend=redis_server, port=0, auth=TokenTable({TOKEN: ""}))
    with StoreServer(config) as server:
        for token in (None, "wrong-token-wrong-token"):
            sock = _hello(server.data_port, token)
            kind, body = _frame(sock)
            assert kind == wire.ERROR
            assert "token" in str(wire.decode_error(body))
            assert sock.recv(1) == b""  # and closed
        sock = _hello(server.data_port, TOKEN)
        assert _frame(sock)[0] == wire.OK
        with StoreClient(server.target, auth_token=TOKEN) as client:
            client.put_many([(key(1), b"v")])
            assert client.get_many([key(1)]) == {key(1): b"v"}
            assert client._data[0] is not None


def test_bad_requests_get_a_clear_error_and_the_key_checks(redis_server):
    limits = StoreLimits(max_keys=4)
    with StoreServer(StoreConfig(backend=redis_server, port=0, limits=limits)) as server:
        sock = socket.create_connection(("127.0.0.1", server.data_port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        kind, body = _frame(sock)
        assert kind == wire.ERROR and "bad magic" in str(wire.decode_error(body))

        sock = _hello(server.data_port)
        assert _frame(sock)[0] == wire.OK
        sock.sendall(wire.REQUEST.pack(wire.OP_GET, 1000, 1_000_000, 2_000_000))  # never sent
        kind, body = _frame(sock)
        assert kind == wire.ERROR and "the limit is 4" in str(wire.decode_error(body))

        with StoreClient(server.target) as client:
            with pytest.raises(InvalidArgument, match="keys are 1 to 200 characters"):
                client.get_many(["has space"])
            with pytest.raises(InvalidArgument, match="more than once"):
                client.get_many([key(1), key(1)])
            client.put_many([(key(1), b"v")])
            assert client.get_many([key(1)]) == {key(1): b"v"}  # still served


def test_a_request_whose_keys_do_not_match_its_lengths_is_refused(redis_server):
    """A Get's keys are read in one call, by the length its head gives: a length that cannot
    hold its keys, keys that end early, or bytes after them are refused with a frame that says
    so, and the store goes on serving."""
    head = functools.partial(wire.REQUEST.pack, wire.OP_GET, 1000)
    bad = {
        "take 2 to 512 bytes; the request says 600": head(2, 600),
        "end before its 2 keys do": head(2, 4) + b"\x05abc",
        "has 2 bytes after its 1 keys": head(1, 4) + b"\x01axy",
    }
    with StoreServer(StoreConfig(backend=redis_server, port=0)) as server:
        for message, request in bad.items():
            sock = _hello(server.data_port)
            assert _frame(sock)[0] == wire.OK
            sock.sendall(request)
            kind, body = _frame(sock)
            assert kind == wire.ERROR and message in str(wire.decode_error(body)), message
            sock.close()
        with StoreClient(server.target) as client:
            client.put_many([(key(1), b"v")])
            assert client.get_many([key(1)]) == {key(1): b"v"}


def test_keys_decode_from_one_body():
    assert wire.decode_keys(b"\x01a\x02bc", 2) == ["a", "bc"]
    assert wire.decode_keys(b"", 0) == []
    with pytest.raises(wire.ProtocolError, match="end before"):
        wire.decode_keys(b"\x01a", 2)
    with pytest.raises(wire.ProtocolError, match="bytes after"):
        wire.decode_keys(b"\x01a\x00", 1)


def test_too_many_connections_are_refused_and_the_client_uses_grpc(redis_server):
    config = StoreConfig(backend=redis_server, port=0, data_max_connections=1)
    with StoreServer(config) as server:
        held = _hello(server.data_port)
        assert _frame(held)[0] == wire.OK
        refused = _hello(server.data_port)
        kind, body = _frame(refused)
        assert kind == wire.ERROR and "--data-max-connections" in str(wire.decode_error(body))
        with StoreClient(server.target) as client:
            client.put_many([(key(1), b"v")])
            assert client.get_many([key(1)]) == {key(1): b"v"}  # by gRPC
        held.close()


def test_an_idle_connection_is_closed(redis_server):
    limits = StoreLimits(idle_s=0.3)
    with StoreServer(StoreConfig(backend=redis_server, port=0, limits=limits)) as server:
        sock = _hello(server.data_port)
        assert _frame(sock)[0] == wire.OK
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed after about 0.3 s without a request


def _fake_store(answer: bytes) -> tuple[int, threading.Thread]:
    """A data port that says hello OK, reads one request and sends `answer`, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(wire.HELLO.size + 0, socket.MSG_WAITALL)
            conn.sendall(wire.frame(wire.OK))
            conn.recv(1 << 16)
            conn.sendall(answer)
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def _run(*values: bytes | None) -> bytes:
    """A Get answer's run as the store sends it: lengths, then the values as Redis frames them."""
    lengths = [wire.MISSING_LENGTH if v is None else len(v) for v in values]
    bulks = b"".join(b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in values)
    return wire.run_head(lengths) + bulks


def test_a_value_cut_short_is_an_error_never_a_shorter_value():
    cut = wire.run_head([1000]) + b"$1000\r\n" + b"x" * 500  # then the connection ends
    port, thread = _fake_store(_run(b"abc", None) + cut)
    got: list[tuple[int, bytes | None]] = []
    path = DataPath("127.0.0.1", port, None, 1)
    with pytest.raises(wire.ProtocolError, match="short"):
        path.get([key(0), key(1), key(2)], time.monotonic() + 5, lambda i, v: got.append((i, v)))
    assert got == [(0, b"abc"), (1, None)]  # the whole value, and nothing of the cut one
    thread.join(5)


@pytest.mark.parametrize(
    "answer",
    [
        wire.run_head([3]) + b"$4\r\nabcd\r\n",  # not the length announced
        wire.run_head([3]) + b"$3\r\nabcXY",  # no CRLF after the value
        wire.run_head([-1]) + b"$0\r\n\r\n",  # an empty value where a missing one was announced
        wire.run_head([2, 3]) + b"$2\r\nab\r\n$3\r\nabc\r\n",  # more values than keys asked
        wire.frame(wire.OK, 1),  # not a run
    ],
)
def test_a_run_that_breaks_its_announced_lengths_is_an_error(answer):
    port, thread = _fake_store(answer)
    got: list[tuple[int, bytes | None]] = []
    path = DataPath("127.0.0.1", port, None, 1)
    with pytest.raises(wire.ProtocolError):
        path.get([key(0)], time.monotonic() + 5, lambda i, v: got.append((i, v)))
    assert got == []
    thread.join(5)


def test_a_store_killed_mid_value_falls_back_to_grpc_with_the_right_values(redis_server):
    """The client's data path breaks inside a value; gRPC answers the keys not answered whole."""
    with StoreServer(StoreConfig(backend=redis_server, port=0)) as server:
        values = {key(i): os.urandom(1 << 20) for i in range(4)}
        with StoreClient(server.target, streams=1) as client:
            client.put_many(list(values.items()))
            cut = wire.run_head([1 << 20]) + wire.bulk_head(1 << 20) + bytes(1000)
            port, thread = _fake_store(_run(values[key(0)]) + cut)
            client._data[0] = DataPath("127.0.0.1", port, None, 1)
            assert client.get_many(list(values)) == values
            assert client._data[0] is None  # dropped after the failure, for a while
            thread.join(5)


def test_redis_killed_mid_value_closes_the_connection_without_a_short_value(redis_process):
    """The store's side: Redis dies while a value is being spliced; the client sees the
    connection end inside the value (an error), never a truncated value."""
    with StoreServer(StoreConfig(backend=redis_process.url, port=0)) as server:
        big = os.urandom(32 << 20)
        with StoreClient(server.target, timeout_s=20) as client:
            client.put_many([(key(1), big)])
        sock = _hello(server.data_port)
        assert _frame(sock)[0] == wire.OK
        sock.sendall(wire.encode_request(wire.OP_GET, [key(1)], 10_000))
        kind, length = wire.decode_frame(sock.recv(wire.FRAME.size, socket.MSG_WAITALL))
        assert (kind, length) == (wire.RUN, 1)
        lengths = wire.decode_run_lengths(sock.recv(8, socket.MSG_WAITALL))
        assert lengths == (len(big),)
        parts = [sock.recv(1 << 16)]
        redis_process.stop()  # mid-value: most of the 32 MiB is still in Redis's buffers
        while chunk := sock.recv(1 << 20):
            parts.append(chunk)
        data = b"".join(parts)
        # Only the value's own bulk reply, then the end of the connection: no error frame or
        # other bytes in the middle that a reader could take for the rest of the value.
        whole = wire.bulk_head(len(big)) + big
        assert len(data) < len(whole) and data == whole[: len(data)]


def test_wire_golden_bytes():
    """The formats docs/store.md describes, byte for byte."""
    assert wire.encode_hello("tok") == b"KVDP\x03\x03\x00tok"
    assert wire.encode_request(wire.OP_GET, ["a", "bc"], 1500) == (
        b"\x01" + struct.pack("<III", 1500, 2, 5) + b"\x01a\x02bc"
    )
    assert wire.run_head([5, -1]) == b"\x00\x02" + b"\x00" * 7 + struct.pack("<qq", 5, -1)
    assert wire.bulk_head(5) + wire.bulk_head(-1) == b"$5\r\n$-1\r\n"
    assert wire.run_bytes([5, -1, 0]) == len(b"$5\r\nvalue\r\n$-1\r\n$0\r\n\r\n")
    error = wire.error_frame(InvalidArgument("no"))
    assert error == b"\x02\x03" + b"\x00" * 7 + b"\x01no"
    assert isinstance(wire.decode_error(error[wire.FRAME.size :]), InvalidArgument)


def test_the_documented_acl_user_is_enough_for_the_data_path(redis_server):
    """The least-privilege Redis user docs/store.md gives serves Get, Lookup and Put on the data
    path itself (its transactions and scripts), not only through redis-py."""
    admin = redis.Redis.from_url(redis_server)
    admin.execute_command("ACL", "SETUSER", "kvpool", *ACL_RULE.split())
    admin.close()
    backend = redis_server.replace("redis://", "redis://kvpool:pw@")
    with StoreServer(StoreConfig(backend=backend, port=0, grace_s=1)) as server:
        values = {key(i): os.urandom(n) for i, n in enumerate([10, 70_000, 1 << 20])}
        with StoreClient(server.target) as client:
            assert client.put_many(list(values.items())) == len(values)
            assert client.get_many([*values, key(99)]) == values
            assert client.lookup([key(0), key(1), key(99)]) == 2
            assert client._data[0] is not None  # the data path answered all three
