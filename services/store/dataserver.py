"""The store's data path: Get, Lookup and Put on a TCP port beside gRPC (docs/store.md, "The
data path").

Why: on a few cores a Get through gRPC Python costs the store process about as much CPU per byte
as the client and Redis together (it parses every message and re-sends every byte). Here the
store reads a window of values and their exact lengths in one Redis transaction and moves the
transaction's bulk replies to the client socket as they are, with `os.splice`
(backends/resp.py), so value bytes never enter Python in the store, and it parses nothing per
value: the client reads the bulk replies against the lengths the store announced. Backends
without a raw stream (memory, a cluster, TLS Redis, split session spaces) answer through the
servicer's own windowed read (`KVStoreServicer.values`: the byte budget, the breaker) and
`sendall` of each value.

Put comes this way too: each value is moved from the client's socket to Redis as one SET as it
arrives (spliced, or copied when small), so the store never holds a whole value either.

One thread per connection, at most `max_connections` at once (more are refused with an ERROR
frame). Each connection authenticates once with the store's token, then sends requests one at a
time; a request's keys pass the same checks as gRPC's (`keys.check_keys`, at most --max-keys,
each key once), and it ends by its own deadline (capped by --max-call-seconds). A connection that
waits more than --idle-seconds for its client (the next request, or room to send) is closed.
It is never served over TLS: `StoreServer` leaves it off when TLS is on.
"""

import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

import grpc

from kvpool.errors import (
    KvpoolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.status import code_for
from services.store import datawire as wire
from services.store.backends.resp import send_all, set_timeouts
from services.store.keys import check_key, check_keys
from services.store.limits import StoreLimits
from services.store.service import BATCH_VALUES, KVStoreServicer, check_unique

if TYPE_CHECKING:
    from services.auth import TokenTable
    from services.status import CallObserver
    from services.store.backends.resp import RespStream

log = logging.getLogger(__name__)

HANDSHAKE_S = 5.0  # a connection that does not say hello within this is closed


class _Closed(Exception):
    """The connection cannot go on (client gone, or a value cut short): close it, no frame."""


def _recv_head(conn: socket.socket, n: int) -> bytes | None:
    """`n` bytes, or None when the client closed cleanly before the first of them."""
    try:
        first = conn.recv(n)
    except OSError as exc:  # the idle timeout, or a reset
        raise _Closed from exc
    if not first:
        return None
    return first + _recv_exact(conn, n - len(first)) if len(first) < n else first


_TCP_ESTABLISHED = 1


def client_gone(conn: socket.socket) -> bool:
    """Whether the client has closed its end (or reset it): its request is stale, as it no
    longer waits for the answer. Read from the kernel's TCP state, which says so even while
    the request's bytes are still unread; where that is not available, from a peek."""
    try:
        return conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED
    except (AttributeError, OSError):  # no TCP_INFO (not Linux), or not a TCP socket
        pass
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # nothing to read: it waits for the answer
    except OSError:
        return True


def _recv_key(conn: socket.socket) -> str:
    raw = _recv_exact(conn, _recv_exact(conn, 1)[0])
    return raw.decode(errors="replace")  # the key checks refuse what is not ASCII


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        try:
            chunk = conn.recv(left)
        except OSError as exc:
            raise _Closed from exc
        if not chunk:
            raise _Closed
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class DataPathServer:
    def __init__(
        self,
        servicer: KVStoreServicer,
        *,
        limits: StoreLimits,
        auth: "TokenTable | None",
        host: str,
        port: int,
        reuse_port: bool = False,
        max_connections: int = 64,
        observe: "CallObserver | None" = None,
    ) -> None:
        if max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        self._servicer = servicer
        self._observe = observe
        self._backend = servicer.backend
        self._limits = limits
        self._auth = auth
        self._host, self._port, self._reuse_port = host, port, reuse_port
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._conns: dict[socket.socket, bool] = {}  # open connection -> inside a request
        self._lock = threading.Lock()
        self._stopping = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        listener = socket.create_server(
            (self._host, self._port), reuse_port=self._reuse_port, backlog=128
        )
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="data-accept", daemon=True)
        self._acceptor.start()
        return self.port

    def _accept(self) -> None:
        listener = self._listener
        while not self._stopping and listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            if not self._slots.acquire(blocking=False):
                self._refuse(conn)
                continue
            with self._lock:
                self._conns[conn] = False
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        busy = ResourceExhausted(
            f"the store's data path has {self._max_connections} connections open "
            "(--data-max-connections); use gRPC"
        )
        try:
            conn.settimeout(0.5)
            conn.sendall(wire.error_frame(busy))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        stream: RespStream | None = None
        try:
            conn.settimeout(None)  # blocking, with kernel timeouts that splice honours too
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_timeouts(conn, HANDSHAKE_S)
            self._hello(conn)
            set_timeouts(conn, self._limits.idle_s or None)  # nothing changes them after this
            while not self._stopping:
                head = _recv_head(conn, wire.REQUEST.size)
                if head is None:
                    return
                with self._lock:
                    self._conns[conn] = True
                stream = self._request(conn, head, stream)
                with self._lock:
                    self._conns[conn] = False
        except KvpoolError as exc:  # between frames: say why, then close
            with contextlib.suppress(OSError):
                conn.sendall(wire.error_frame(exc))
        except (_Closed, OSError):
            pass
        except Exception:  # a bug: never leave a client waiting on a half-sent answer
            log.exception("data path connection failed")
        finally:
            if stream is not None:
                stream.close()
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()
            self._slots.release()

    def _hello(self, conn: socket.socket) -> None:
        head = _recv_exact(conn, wire.HELLO.size)
        token = _recv_exact(conn, wire.decode_hello(head))
        if self._auth is not None and self._auth.tenant_for(b"Bearer " + token) is None:
            raise Unauthenticated("the store's data path needs the store's token")
        conn.sendall(wire.frame(wire.OK))

    def _request(
        self, conn: socket.socket, head: bytes, stream: "RespStream | None"
    ) -> "RespStream | None":
        """Serve one request; returns the Redis stream to keep for the next (None: closed)."""
        request = wire.decode_request_head(head)
        if request.n_keys > self._limits.max_keys:
            raise ResourceExhausted(
                f"{request.n_keys} keys in one request; the limit is {self._limits.max_keys}"
            )
        method = {wire.OP_GET: "Get", wire.OP_LOOKUP: "Lookup", wire.OP_PUT: "Put"}[request.op]
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            if request.op == wire.OP_PUT:
                return self._put(conn, request, stream)
            body = _recv_exact(conn, wire.check_keys_len(request))
            keys = wire.decode_keys(body, request.n_keys)
            return self._answer(conn, request, keys, stream)
        except (_Closed, OSError):  # the client left, or stalled past --idle-seconds
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException as exc:
            code = code_for(exc) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            if self._observe is not None:  # the same series as gRPC's calls (metrics.py)
                self._observe(method, code, time.monotonic() - started)

    def _answer(
        self,
        conn: socket.socket,
        request: wire.RequestHead,
        keys: list[str],
        stream: "RespStream | None",
    ) -> "RespStream | None":
        check_keys(keys, self._limits.max_keys)
        deadline, stream = self._begin(request, stream)
        if request.op == wire.OP_LOOKUP:
            if stream is None:
                present = self._servicer.lookup_keys(keys, deadline)
            else:
                try:
                    stream.set_deadline(deadline - time.monotonic())
                    present = stream.lookup(keys)
                except BaseException:
                    stream.close()  # out of step with its replies
                    raise
                self._servicer.count_lookup(len(keys), present)
            conn.sendall(wire.frame(wire.OK, present))
            return stream
        check_unique(keys)
        if stream is None:
            self._get_through_backend(conn, keys, deadline)
            return None
        try:
            self._get_raw(conn, stream, keys, deadline)
        except BaseException:
            stream.close()
            raise
        return stream

    def _begin(
        self, request: wire.RequestHead, stream: "RespStream | None"
    ) -> tuple[float, "RespStream | None"]:
        """A request's deadline (its own, capped by --max-call-seconds), once the backend's
        breaker lets it through, and the raw Redis stream to serve it on (None: the backend)."""
        seconds = request.deadline_ms / 1e3 or self._limits.max_call_s
        deadline = time.monotonic() + min(seconds, self._limits.max_call_s)
        self._servicer.breaker.check()
        if stream is None:
            opener = getattr(self._backend, "open_stream", None)
            stream = opener() if opener is not None else None
        return deadline, stream

    def _get_through_backend(self, conn: socket.socket, keys: list[str], deadline: float) -> None:
        """A run of one value each, framed as Redis frames it (the client reads one format)."""
        values = self._servicer.values(keys, deadline)
        try:
            for _, value in values:
                if value is None:
                    missing = wire.MISSING_LENGTH
                    self._send(conn, wire.run_head([missing]) + wire.bulk_head(missing))
                    continue
                head = wire.run_head([len(value)]) + wire.bulk_head(len(value))
                self._send(conn, head, value, b"\r\n")
        finally:
            values.close()  # its windows give their bytes back

    def _get_raw(
        self, conn: socket.socket, stream: "RespStream", keys: list[str], deadline: float
    ) -> None:
        """One Redis transaction per window (windows of about --window bytes, planned from the
        values' sizes), pipelined one window ahead, so Redis never buffers more than two windows
        for this connection and the store buffers none. A transaction reads its values' exact
        lengths with them, so the store relays its bulk replies to the client as one run,
        spliced, without parsing them."""
        stream.set_deadline(deadline - time.monotonic())
        windows = self._servicer.plan([min(max(n, 0), 1 << 40) for n in stream.lengths(keys)])
        stream.send_window(keys[windows[0].start : windows[0].end])
        found = missing = sent = 0
        try:
            for n, window in enumerate(windows):
                if n + 1 < len(windows):
                    ahead = windows[n + 1]
                    stream.send_window(keys[ahead.start : ahead.end])
                lengths = stream.window_lengths(window.end - window.start)
                now = time.monotonic()
                if now >= deadline:
                    raise Unavailable("the Get ran past its deadline on the data path")
                stream.rearm(deadline)
                try:
                    stream.relay(wire.run_bytes(lengths), conn, head=wire.run_head(lengths))
                except OSError as exc:  # the client went away inside a run
                    raise _Closed from exc
                except KvpoolError as exc:  # Redis did, inside a run: no frame can follow
                    raise _Closed from exc
                for length in lengths:
                    if length < 0:
                        missing += 1
                    else:
                        found += 1
                        sent += length
        finally:
            self._servicer.count_get(found, missing, sent)

    def _put(
        self, conn: socket.socket, request: wire.RequestHead, stream: "RespStream | None"
    ) -> "RespStream | None":
        """A Put: each value read from the client as it comes and written as one SET; answered
        with one OK frame saying how many the store kept."""
        ttl_s = self._servicer.ttl_for(request.word)
        deadline, stream = self._begin(request, stream)
        if stream is None:
            stored = self._put_through_backend(conn, request.n_keys, ttl_s, deadline)
        else:
            try:
                stored = self._put_raw(conn, stream, request.n_keys, ttl_s, deadline)
            except BaseException:
                stream.close()  # Redis may hold half a SET or an open MULTI: closing drops both
                raise
        conn.sendall(wire.frame(wire.OK, stored))
        return stream

    def _item(self, conn: socket.socket, deadline: float) -> tuple[str, int]:
        """The next put item's key and value length, checked before any of the value is read."""
        if time.monotonic() >= deadline:
            raise Unavailable("the Put ran past its deadline on the data path")
        key = _recv_key(conn)
        (size,) = wire.VALUE_LENGTH.unpack(_recv_exact(conn, wire.VALUE_LENGTH.size))
        check_key(key)
        if size > self._limits.max_block_bytes:
            raise ResourceExhausted(
                f"block {key!r} is {size} bytes; the limit is {self._limits.max_block_bytes} "
                "bytes (--max-block-bytes)"
            )
        return key, size

    def _put_raw(
        self, conn: socket.socket, stream: "RespStream", n: int, ttl_s: int | None, deadline: float
    ) -> int:
        """SETs pipelined to Redis in transactions of about --batch-bytes, each value moved from
        the client's socket as it arrives (at most the bounce buffer or the pipe held here, so
        no byte budget is taken). A transaction is applied only while the client still waits:
        a Put read after its client gave up (the store was paused, say) is not applied late."""
        received = stored = open_sets = open_bytes = 0
        stream.set_deadline(deadline - time.monotonic())
        for i in range(n):
            key, size = self._item(conn, deadline)
            stream.rearm(deadline)
            if not open_sets:
                stream.begin()
            stream.send_set(key, size, conn, ttl_s)
            open_sets, open_bytes, received = open_sets + 1, open_bytes + size, received + size
            if open_bytes >= self._limits.batch_bytes or open_sets >= BATCH_VALUES or i + 1 == n:
                stream.set_deadline(max(deadline - time.monotonic(), 0.001))
                waiting = not client_gone(conn)
                stored += stream.commit(open_sets, apply=waiting)
                if not waiting:
                    raise _Closed  # nobody to answer, and nothing more applied
                open_sets = open_bytes = 0
        self._servicer.count_put(stored, received)
        return stored

    def _put_through_backend(
        self, conn: socket.socket, n: int, ttl_s: int | None, deadline: float
    ) -> int:
        """Values read into memory within the store's byte budget (--max-inflight-bytes) and
        written in batches through the backend, as gRPC's Put does; each batch only while the
        client still waits."""
        budget = self._servicer.budget
        pending: list[tuple[str, bytes | memoryview]] = []
        held = stored = 0

        def flush() -> None:
            nonlocal pending, held, stored
            if client_gone(conn):
                raise _Closed  # it stopped waiting: nothing more is applied late
            stored += self._servicer.put_blocks(pending, ttl_s, deadline)
            budget.release(held)
            pending, held = [], 0

        try:
            for _ in range(n):
                key, size = self._item(conn, deadline)
                if not budget.try_acquire(size):
                    flush()  # never wait for room while holding values
                    budget.acquire(size, deadline)
                held += size
                pending.append((key, _recv_exact(conn, size)))
                if held >= self._limits.batch_bytes or len(pending) >= BATCH_VALUES:
                    flush()
            flush()
        finally:
            budget.release(held)
        return stored

    @staticmethod
    def _send(conn: socket.socket, *parts: bytes | memoryview) -> None:
        try:
            send_all(conn, parts)
        except OSError as exc:  # the client stopped reading for --idle-seconds, or left
            raise _Closed from exc

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting; requests in flight get `grace_s`, then every connection is closed."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._lock:
                if not any(self._conns.values()):
                    break
            time.sleep(0.02)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
