"""The client side of the store's data path (docs/store.md, "The data path"; wire: `datawire`).

`StoreClient` uses it for Get, Lookup and Put when the store advertises a data port (Stats) and the
channel is not TLS, and goes back to gRPC on any failure. Each value's length comes before its
bytes (a run announces its values' lengths, then carries them as Redis framed them), and the
value is read with one `recv(length, MSG_WAITALL)` (one copy, straight into the `bytes` the caller
gets), so a connection that ends inside a value raises: a value is whole or it is not returned.

At most `max_connections` connections per client; a call that finds none free uses gRPC.
"""

import select
import socket
import threading
import time
from collections.abc import Callable

from kvpool.errors import Unavailable
from services.store import datawire as wire
from services.store.backends.resp import REARM_S, send_all, set_timeouts

# The largest value length a store frame may announce: more is a broken stream, not a value.
MAX_VALUE_BYTES = 1 << 30


class DataPath:
    """A pool of authenticated data path connections to one store process's data port."""

    def __init__(self, host: str, port: int, token: str | None, max_connections: int) -> None:
        self.host, self.port = host, port
        self._hello = wire.encode_hello(token)
        self._idle: list[socket.socket] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()

    def _connect(self, deadline: float) -> socket.socket:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable("no time left to connect to the store's data path")
        sock = socket.create_connection((self.host, self.port), timeout=min(left, 1.0))
        try:
            sock.settimeout(None)  # blocking, with kernel timeouts (MSG_WAITALL needs it)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_timeouts(sock, left)
            sock.sendall(self._hello)
            kind, length = wire.decode_frame(_recv_exact(sock, wire.FRAME.size))
            if kind == wire.ERROR:
                raise wire.decode_error(_recv_exact(sock, length))
            if kind != wire.OK:
                raise wire.ProtocolError(f"the data path answered hello with frame kind {kind}")
        except BaseException:
            sock.close()
            raise
        return sock

    def _checkout(self, deadline: float) -> socket.socket | None:
        if not self._slots.acquire(blocking=False):
            return None
        try:
            while True:
                with self._lock:
                    sock = self._idle.pop() if self._idle else None
                if sock is None:
                    return self._connect(deadline)
                # An idle connection the store closed (its --idle-seconds) reads as EOF now.
                if not select.select([sock], [], [], 0)[0]:
                    return sock
                sock.close()
        except BaseException:
            self._slots.release()
            raise

    def _checkin(self, sock: socket.socket, reusable: bool) -> None:
        if reusable:
            with self._lock:
                self._idle.append(sock)
        else:
            sock.close()
        self._slots.release()

    def get(
        self, keys: list[str], deadline: float, on_value: Callable[[int, bytes | None], None]
    ) -> bool:
        """`on_value(i, value or None)` for each key in order. False when no connection was free
        (nothing was asked); raises on any failure, after the values that arrived whole."""
        sock = self._checkout(deadline)
        if sock is None:
            return False
        ok = False
        try:
            sock.sendall(wire.encode_request(wire.OP_GET, keys, _ms_left(deadline)))
            timer, done = _Timeouts(sock, deadline), 0
            while done < len(keys):
                timer.check()
                kind, length = wire.decode_frame(_recv_exact(sock, wire.FRAME.size))
                if kind == wire.ERROR:
                    raise wire.decode_error(_recv_exact(sock, length))
                if kind != wire.RUN or not 0 < length <= len(keys) - done:
                    raise wire.ProtocolError(
                        f"frame kind {kind} (length {length}) in a Get answer with "
                        f"{len(keys) - done} values to come"
                    )
                lengths = wire.decode_run_lengths(_recv_exact(sock, 8 * length, deadline))
                _read_run(sock, lengths, done, timer, on_value)
                done += length
            ok = True
        finally:
            self._checkin(sock, ok)
        return True

    def put(
        self, items: list[tuple[str, bytes | memoryview]], ttl_s: int, deadline: float
    ) -> int | None:
        """Write `items`; how many the store kept, or None when no connection was free (nothing
        was sent). Raises on any failure: some values may be stored, each whole or not at all
        (a Put may be sent again: a SET of the same block is the same block)."""
        parts = wire.encode_put(items, _ms_left(deadline), ttl_s)  # Unencodable: gRPC
        sock = self._checkout(deadline)
        if sock is None:
            return None
        ok = False
        try:
            set_timeouts(sock, _left(deadline))
            try:
                send_all(sock, parts)
            except OSError:
                # The store refused part way (an ERROR frame, then it closed): say what it said.
                kind, length = wire.decode_frame(_recv_exact(sock, wire.FRAME.size))
                if kind == wire.ERROR:
                    raise wire.decode_error(_recv_exact(sock, length)) from None
                raise
            stored = _count_answer(sock, "a Put", len(items))
            ok = True
            return stored
        finally:
            self._checkin(sock, ok)

    def lookup(self, keys: list[str], deadline: float) -> int | None:
        """The present prefix; None when no connection was free. Raises on any failure."""
        sock = self._checkout(deadline)
        if sock is None:
            return None
        ok = False
        try:
            sock.sendall(wire.encode_request(wire.OP_LOOKUP, keys, _ms_left(deadline)))
            set_timeouts(sock, _left(deadline))
            present = _count_answer(sock, "a Lookup", len(keys))
            ok = True
            return present
        finally:
            self._checkin(sock, ok)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _count_answer(sock: socket.socket, what: str, most: int) -> int:
    """The OK frame that answers a Lookup or a Put: its length, a count of at most `most`."""
    kind, length = wire.decode_frame(_recv_exact(sock, wire.FRAME.size))
    if kind == wire.ERROR:
        raise wire.decode_error(_recv_exact(sock, length))
    if kind != wire.OK or length > most:
        raise wire.ProtocolError(f"{what} of {most} keys answered {kind}/{length}")
    return length


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Unavailable("the store's data path did not answer within the call's deadline")
    return left


def _ms_left(deadline: float) -> int:
    return max(1, int(_left(deadline) * 1e3))


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    data = sock.recv(n, socket.MSG_WAITALL) if n else b""
    if len(data) == n:
        return data
    return _finish(sock, n, data, deadline)


class _Timeouts:
    """A Get's kernel timeouts, re-armed to what its deadline leaves every REARM_S (not two
    setsockopt calls for every value); raises once the deadline has passed."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self._armed_at = sock, deadline, -REARM_S

    def check(self) -> None:
        now = time.monotonic()
        if now - self._armed_at >= REARM_S:
            set_timeouts(self.sock, _left(self.deadline))
            self._armed_at = now
        elif now >= self.deadline:
            _left(self.deadline)  # raises: the call ran past its deadline


def _read_run(
    sock: socket.socket,
    lengths: tuple[int, ...],
    first: int,
    timer: _Timeouts,
    on_value: Callable[[int, bytes | None], None],
) -> None:
    """A run's bulk replies (the values of keys `first`, `first + 1`, ...), each checked against
    the length announced for it: a value is read with one `recv` straight into the `bytes` the
    caller gets, and given to it once the CRLF after it, read with the next reply's head (two
    calls a value), is there."""
    deadline = timer.deadline
    held: tuple[int, bytes | None] | None = None  # read, its CRLF not yet
    for j, length in enumerate(lengths):
        if length > MAX_VALUE_BYTES or length < wire.MISSING_LENGTH:
            raise wire.ProtocolError(
                f"a value of {length} bytes announced (at most {MAX_VALUE_BYTES})"
            )
        timer.check()
        expected = (b"\r\n" if held else b"") + wire.bulk_head(length)
        if _recv_exact(sock, len(expected), deadline) != expected:
            raise wire.ProtocolError(f"a run's reply {j} is not the {length} bytes announced")
        if held:
            on_value(*held)
            held = None
        if length == wire.MISSING_LENGTH:
            on_value(first + j, None)
        else:
            held = (first + j, _recv_exact(sock, length, deadline))
    if held:
        if _recv_exact(sock, 2, deadline) != b"\r\n":
            raise wire.ProtocolError("a run's last value is not followed by its CRLF")
        on_value(*held)


def _finish(sock: socket.socket, n: int, first: bytes, deadline: float | None) -> bytes:
    """The rest of `n` bytes after a short read (a signal, or the end of the stream)."""
    if not first:
        raise wire.ProtocolError(f"the data path ended {n} bytes short of a frame")
    parts, got = [first], len(first)
    while got < n:
        if deadline is not None:
            set_timeouts(sock, _left(deadline))
        chunk = sock.recv(n - got, socket.MSG_WAITALL)
        if not chunk:
            raise wire.ProtocolError(f"the data path ended {n - got} bytes short of a frame")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
