"""RespStream, the data path's raw Redis connection, against a socket that plays Redis.

One layer only: the real redis-server cases are in test_datapath.py. Here a Unix socket sends
exactly the bytes a test needs (a value cut short, a reply without its CRLF), and the "client"
is the other end of a socketpair, so what reached it is read byte for byte.
"""

import socket
import threading

import pytest

from kvpool.errors import Unavailable
from services.store import datawire as wire
from services.store.backends.resp import RespStream, send_all


@pytest.fixture
def redis_and_stream(tmp_path):
    path = tmp_path / "redis.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    stream = RespStream(
        f"unix://{path}", password=None, timeout_s=5.0, shown="test", lookup_script=""
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


def _window_reply(lengths: list[int]) -> bytes:
    """What Redis answers a `send_window` of len(lengths) keys, up to the values' bulk replies."""
    queued = b"+QUEUED\r\n" * (len(lengths) + 1)
    ints = b"".join(b":%d\r\n" % n for n in lengths)
    return b"+OK\r\n" + queued + b"*%d\r\n*%d\r\n" % (len(lengths) + 1, len(lengths)) + ints


def test_a_window_asks_lengths_and_values_in_one_transaction(redis_and_stream):
    redis_side, stream, _client, _store = redis_and_stream
    redis_side.sendall(b"*2\r\n:1\r\n:-1\r\n")
    assert stream.lengths(["a", "bc"]) == [1, -1]  # loads the script the window runs
    redis_side.recv(1 << 16)
    stream.send_window(["a", "bc"])
    sent = redis_side.recv(1 << 16)
    assert sent.startswith(b"*1\r\n$5\r\nMULTI\r\n*5\r\n$7\r\nEVALSHA\r\n$40\r\n")
    assert sent.endswith(
        b"$1\r\n2\r\n$1\r\na\r\n$2\r\nbc\r\n"  # the EVAL's key count and keys
        b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$2\r\nbc\r\n*1\r\n$4\r\nEXEC\r\n"
    )


@pytest.mark.parametrize("size", [0, 5, 70_000, 256 << 10, (256 << 10) + 1, 2 << 20])
def test_a_run_reaches_the_client_after_its_head_untouched_and_the_next_reply_reads_on(
    redis_and_stream, size
):
    redis_side, stream, client, store = redis_and_stream
    value = bytes(range(256)) * (size // 256) + b"v" * (size % 256)
    bulks = b"$%d\r\n" % size + value + b"\r\n$-1\r\n"
    sender = threading.Thread(
        target=redis_side.sendall, args=(_window_reply([size, -1]) + bulks + _window_reply([7]),)
    )
    sender.start()
    assert stream.window_lengths(2) == [size, -1]
    got = threading.Thread(target=lambda: received.append(_receive(client)))
    received: list[bytes] = []
    got.start()
    stream.relay(wire.run_bytes([size, -1]), store, head=b"HEAD")
    assert stream.window_lengths(1) == [7]  # the run's bytes were all relayed: the next parses
    store.shutdown(socket.SHUT_WR)
    got.join(10)
    sender.join(10)
    assert received == [b"HEAD" + bulks]


def test_a_small_run_cut_short_sends_nothing_of_itself(redis_and_stream):
    redis_side, stream, client, store = redis_and_stream
    redis_side.sendall(_window_reply([70_000]) + b"$70000\r\n" + b"x" * 1000)
    redis_side.close()  # Redis died inside the value
    assert stream.window_lengths(1) == [70_000]
    with pytest.raises(Unavailable, match="inside a value"):
        stream.relay(wire.run_bytes([70_000]), store, head=b"HEAD")
    store.shutdown(socket.SHUT_WR)
    assert _receive(client) == b""  # neither its frame head nor any of its bytes


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"+OK\r\n+QUEUED\r\n+QUEUED\r\n-EXECABORT Transaction discarded\r\n", "EXECABORT"),
        (b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*-1\r\n", "for a transaction"),
        (b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n-ERR script failed\r\n", "script failed"),
        (b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n*2\r\n:1\r\n:2\r\n", "2 lengths for 1 keys"),
    ],
)
def test_a_transaction_that_failed_or_is_malformed_is_refused(redis_and_stream, reply, error):
    redis_side, stream, _client, _store = redis_and_stream
    redis_side.sendall(reply)
    with pytest.raises(Unavailable, match=error):
        stream.window_lengths(1)


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
