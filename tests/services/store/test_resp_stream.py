"""RespStream, the data path's raw Redis connection, against a socket that plays Redis.

One layer only: the real redis-server cases are in test_datapath.py. Here a Unix socket sends
exactly the bytes a test needs (a value cut short, a reply without its CRLF), and the "client"
is the other end of a socketpair, so what reached it is read byte for byte.
"""

import socket
import threading

import pytest

from kvpool.errors import Unavailable
from services.store.backends.resp import RespStream, send_all


@pytest.fixture
def redis_and_stream(tmp_path):
    path = tmp_path / "redis.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stream = RespStream(
        f"unix://{path}", password=None, timeout_s=5.0, shown="test", scripts=("", "")
    )
    redis_side, _ = listener.accept()
    client, store = socket.socketpair()
    yield redis_side, stream, client, store
    for sock in (redis_side, listener, client, store):
        sock.close()
    stream.close()


def _receive(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("size", [0, 5, 70_000, 256 << 10, (256 << 10) + 1, 2 << 20])
def test_a_value_reaches_the_client_after_its_head_and_the_next_reply_reads_on(
    redis_and_stream, size
):
    redis_side, stream, client, store = redis_and_stream
    value = bytes(range(256)) * (size // 256) + b"v" * (size % 256)
    sender = threading.Thread(
        target=redis_side.sendall, args=(b"$%d\r\n" % size + value + b"\r\n$-1\r\n",)
    )
    sender.start()
    assert stream.bulk_length() == size
    got = threading.Thread(target=lambda: received.append(_receive(client)))
    received: list[bytes] = []
    got.start()
    stream.move(size, store, head=b"HEAD")
    assert stream.bulk_length() is None  # the CRLF was eaten: the next reply parses
    store.shutdown(socket.SHUT_WR)
    got.join(10)
    sender.join(10)
    assert received == [b"HEAD" + value]


def test_a_small_value_cut_short_sends_nothing_of_itself(redis_and_stream):
    redis_side, stream, client, store = redis_and_stream
    redis_side.sendall(b"$70000\r\n" + b"x" * 1000)
    redis_side.close()  # Redis died inside the value
    assert stream.bulk_length() == 70_000
    with pytest.raises(Unavailable, match="inside a value"):
        stream.move(70_000, store, head=b"HEAD")
    store.shutdown(socket.SHUT_WR)
    assert _receive(client) == b""  # neither its frame head nor any of its bytes


def test_a_value_without_its_crlf_is_refused(redis_and_stream):
    redis_side, stream, _client, store = redis_and_stream
    redis_side.sendall(b"$3\r\nabcXY")
    assert stream.bulk_length() == 3
    with pytest.raises(Unavailable, match="without its CRLF"):
        stream.move(3, store)


def test_send_all_sends_every_part_in_order_through_partial_sends():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel sends it in pieces
    parts = [b"", b"head", memoryview(b"x" * 300_000), b"", b"tail"]
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_receive(b)))
    reader.start()
    send_all(a, parts)
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert received == [b"head" + b"x" * 300_000 + b"tail"]
    a.close()
    b.close()
