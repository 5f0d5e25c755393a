"""A raw RESP connection to one Redis for the data path: values move from Redis's socket to the
client's without the store parsing them (docs/store.md, "The data path").

redis-py reads every reply into a Python `bytes`; here a Get reads a window of values in one
transaction that first reads their exact lengths, so the store knows how many bytes the values'
bulk replies take without parsing them, and moves those bytes from the Redis socket to the client
socket as they are (the client reads the bulk replies itself): with `os.splice` through a pipe
(Linux: the kernel moves them, no copy into Python), or with `recv_into` and `sendall` of one
reused buffer when they are few or splice is missing. One `RespStream` per data path connection,
opened on its first request; Redis only ever sees GET, SET, EVALSHA, SCRIPT LOAD, MULTI/EXEC/DISCARD
and the handshake. TLS Redis (`rediss://`) has no raw stream: the data path then reads through the
backend (`RedisStore.get_many`), as gRPC does.
"""

import hashlib
import os
import socket
import struct
import time
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from kvpool.errors import InvalidArgument, PermissionDenied, Unavailable

_SPLICE = hasattr(os, "splice")
_PIPE_BYTES = 1 << 20  # the most Linux gives an unprivileged pipe (/proc/sys/fs/pipe-max-size)
_BOUNCE_BYTES = 256 << 10
# Up to this many bytes are read into the bounce buffer and sent with their frame head in one
# `sendmsg`: one copy through Python costs less than splicing's five or six calls.
_COPY_BYTES = _BOUNCE_BYTES
_F_SETPIPE_SZ = 1031
_HEAD_READ_BYTES = 4096
# How often a call re-arms its kernel timeouts to the time its deadline leaves: it ends at most
# this much after its deadline, and a call of many small values does not pay two syscalls each.
REARM_S = 0.05
# Each key's length, -1 for a missing one (STRLEN says 0): with the GETs in one transaction, so
# the bytes of their bulk replies are known before they come. The backend's `sizes` reads it too
# (missing as 0), to plan a Get's windows.
LENGTHS = (
    "local out = {} for i, key in ipairs(KEYS) do "
    "out[i] = redis.call('EXISTS', key) == 1 and redis.call('STRLEN', key) or -1 end return out"
)


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return struct.pack("ll", 0, 0)  # the kernel's "never"
    seconds = max(seconds, 0.001)  # 0 would mean "never"
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def set_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """Blocking-socket timeouts the kernel enforces (None: none), so `os.splice` honours them
    too (Python's own `settimeout` makes the socket non-blocking, which splice does not wait on).
    A timed-out call raises BlockingIOError, an OSError."""
    tv = _timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def send_all(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """Send `parts` back to back with as few calls as the kernel allows (`sendmsg`)."""
    views = [memoryview(part) for part in parts if len(part)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_into_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; ConnectionError when it ends first (OSError as it comes)."""
    got = 0
    while got < len(view):
        read = sock.recv_into(view[got:])
        if not read:
            raise ConnectionError("the client ended inside a value")
        got += read


def _command(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespError(Unavailable):
    """Redis answered a command with an error reply."""


class RespStream:
    """One raw connection to Redis; not thread-safe (one per data path connection)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None,
        timeout_s: float,
        shown: str,
        lookup_script: str,
    ) -> None:
        """`lookup_script`: the backend's Lookup script (backends/redis.py)."""
        self._lookup_script = lookup_script
        parts = urlsplit(url)
        self._shown = shown
        self._timeout_s = timeout_s
        try:
            if parts.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(min(timeout_s, 2.0))
                sock.connect(parts.path)
                db = int(parse_qs(parts.query).get("db", ["0"])[0])
            elif parts.scheme == "redis":
                sock = socket.create_connection(
                    (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=min(timeout_s, 2.0)
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                db = int((parts.path or "/0").strip("/") or 0)
            else:
                raise InvalidArgument(f"no raw RESP stream for {parts.scheme}:// (TLS or cluster)")
        except OSError as exc:
            raise Unavailable(f"Redis at {shown} is unreachable (data path): {exc}") from exc
        sock.settimeout(None)
        set_timeouts(sock, timeout_s)
        self._armed_at = time.monotonic()
        self._sock = sock
        self._buf = bytearray()
        self._pipe: tuple[int, int] | None = None
        self._bounce: memoryview | None = None
        self._shas: dict[str, bytes] = {}
        self._scripts: dict[bytes, bytes] = {}
        user = unquote(parts.username) if parts.username else None
        secret = unquote(parts.password) if parts.password else password
        hello: list[bytes] = []
        if secret is not None:
            auth = (b"AUTH", user.encode(), secret.encode()) if user else (b"AUTH", secret.encode())
            hello.append(_command(*auth))
        if db:
            hello.append(_command(b"SELECT", str(db).encode()))
        if hello:
            self._send(b"".join(hello))
            for _ in hello:
                self._simple()

    # --- reading replies -------------------------------------------------------------------

    def _fill(self) -> None:
        try:
            # Small reads: what a reply head brings along of its value goes through Python, the
            # rest is spliced.
            chunk = self._sock.recv(_HEAD_READ_BYTES)
        except OSError as exc:
            raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc
        if not chunk:
            raise Unavailable(f"Redis at {self._shown} closed the connection (data path)")
        self._buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                return line
            if len(self._buf) > 1 << 16:
                raise Unavailable(f"Redis at {self._shown} sent a reply line over 64 KiB")
            self._fill()

    def _check(self, line: bytes) -> bytes:
        if line[:1] == b"-":
            message = line[1:].decode(errors="replace")
            if message.startswith("NOPERM"):
                raise PermissionDenied(f"Redis at {self._shown} refused (NOPERM): {message}")
            raise RespError(message)
        return line

    def _simple(self) -> bytes:
        return self._check(self._line())

    def integers(self) -> list[int]:
        """An array reply of integers (a script's), or one integer reply as a list of one."""
        line = self._simple()
        if line[:1] == b":":
            return [int(line[1:])]
        if line[:1] != b"*":
            raise Unavailable(f"Redis at {self._shown} sent {line[:20]!r} for an array")
        return [int(self._simple()[1:]) for _ in range(int(line[1:]))]

    def relay(self, n: int, out: socket.socket, head: bytes = b"") -> None:
        """Send `head`, then the next `n` bytes Redis sends, untouched, to `out`."""
        if n <= _COPY_BYTES:
            self._send_copied(n, out, head)
            return
        if head:
            out.sendall(head, socket.MSG_MORE)
        held = min(n, len(self._buf))
        left = n - held
        if held:
            out.sendall(self._buf[:held], socket.MSG_MORE if left else 0)
            del self._buf[:held]
        if left:
            if _SPLICE:
                self._splice(left, out)
            else:
                self._copy(left, out)

    def _pipe_fds(self) -> tuple[int, int]:
        if self._pipe is None:
            self._pipe = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe only means more calls
        return self._pipe

    def _splice(self, left: int, out: socket.socket) -> None:
        read_end, write_end = self._pipe_fds()
        src, dst = self._sock.fileno(), out.fileno()
        while left:
            try:
                got = os.splice(src, write_end, min(left, _PIPE_BYTES))
            except OSError as exc:
                raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc
            if not got:
                raise Unavailable(f"Redis at {self._shown} closed the connection inside a value")
            left -= got
            while got:  # the client's socket errors (OSError) propagate as they are
                got -= os.splice(read_end, dst, got)

    def _send_copied(self, n: int, out: socket.socket, head: bytes) -> None:
        """A few bytes: read them into the bounce buffer, send them after `head` in one call."""
        buf = self._bounce_buffer()
        got = min(n, len(self._buf))
        buf[:got] = self._buf[:got]
        del self._buf[:got]
        while got < n:
            try:
                read = self._sock.recv_into(buf[got:n])
            except OSError as exc:
                raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc
            if not read:
                raise Unavailable(f"Redis at {self._shown} closed the connection inside a value")
            got += read
        send_all(out, (head, buf[:n]))  # the client's socket errors (OSError) propagate

    def _bounce_buffer(self) -> memoryview:
        if self._bounce is None:
            self._bounce = memoryview(bytearray(_BOUNCE_BYTES))
        return self._bounce

    def _copy(self, left: int, out: socket.socket) -> None:
        bounce = self._bounce_buffer()
        while left:
            try:
                got = self._sock.recv_into(bounce, min(left, _BOUNCE_BYTES))
            except OSError as exc:
                raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc
            if not got:
                raise Unavailable(f"Redis at {self._shown} closed the connection inside a value")
            out.sendall(bounce[:got])
            left -= got

    # --- writing values ----------------------------------------------------------------------

    def send_set(self, key: str, n: int, src: socket.socket, ttl_s: int | None) -> None:
        """Send `SET key VALUE [EX ttl_s]` whose VALUE is the next `n` bytes read from `src`
        (a client socket), moved as they come: copied through the bounce buffer when small,
        spliced otherwise, inside a transaction (`begin`, `commit`). A failure inside the value
        leaves Redis holding half a command: the caller must close this stream, which makes
        Redis drop it and the open transaction (a SET is applied whole or not at all).

        Raises ConnectionError when `src` ends inside the value, Unavailable when Redis fails."""
        raw = key.encode()
        head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (5 if ttl_s else 3, len(raw), raw, n)
        ttl = str(ttl_s).encode() if ttl_s else b""
        tail = b"\r\n$2\r\nEX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl) if ttl_s else b"\r\n"
        if n <= _COPY_BYTES:
            buf = self._bounce_buffer()
            _recv_into_exactly(src, buf[:n])
            self._send_parts((head, buf[:n], tail))
            return
        self._send(head)
        self._splice_in(src, n)
        self._send(tail)

    def begin(self) -> None:
        """Open a transaction (MULTI): the SETs sent next are applied by `commit`, all at once,
        or by none if this stream closes first (Redis drops an open MULTI with its client)."""
        self._send(b"*1\r\n$5\r\nMULTI\r\n")

    def commit(self, n: int, apply: bool = True) -> int:
        """End the transaction of `n` SETs: EXEC (`apply`), or DISCARD; how many were stored.
        An error reply (a full Redis, say) is raised once every reply is read, so the stream
        stays in step."""
        self._send(b"*1\r\n$4\r\nEXEC\r\n" if apply else b"*1\r\n$7\r\nDISCARD\r\n")
        self._simple()  # MULTI's +OK
        first_error: RespError | None = None
        for _ in range(n):  # +QUEUED each, or an error (EXEC then aborts them all)
            try:
                self._simple()
            except RespError as exc:
                first_error = first_error or exc
        if not apply:
            self._simple()  # DISCARD's +OK
            return 0
        try:
            line = self._simple()  # *n: EXEC's replies, one per SET
        except RespError as exc:  # EXECABORT
            raise first_error or exc from None
        stored = 0
        for _ in range(int(line[1:]) if line[:1] == b"*" else 0):
            try:
                self._simple()
                stored += 1
            except RespError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return stored

    def _splice_in(self, src: socket.socket, left: int) -> None:
        read_end, write_end = self._pipe_fds()
        dst = self._sock.fileno()
        while left:
            got = os.splice(src.fileno(), write_end, min(left, _PIPE_BYTES))  # OSError: src's
            if not got:
                raise ConnectionError("the client ended inside a value")
            left -= got
            while got:
                try:
                    got -= os.splice(read_end, dst, got)
                except OSError as exc:
                    raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc

    def _send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        try:
            send_all(self._sock, parts)
        except OSError as exc:
            raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc

    # --- commands ----------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> int:
        return self.script(self._lookup_script, keys)[0]

    def lengths(self, keys: Sequence[str]) -> list[int]:
        """Each key's length, -1 for a missing key (and the script `send_window` runs is then
        loaded on this connection)."""
        return self.script(LENGTHS, keys)

    def send_window(self, keys: Sequence[str]) -> None:
        """One transaction: each key's exact length (-1: missing), then each key's GET. Its
        reply: `window_lengths`, then the bulk replies, whose bytes the lengths give exactly.
        Call `lengths` first on this connection: it loads the script (were it flushed since,
        the transaction fails, and the caller closes this stream)."""
        raw = [key.encode() for key in keys]
        sha = self._shas[LENGTHS]
        commands = [_command(b"MULTI"), _command(b"EVALSHA", sha, b"%d" % len(raw), *raw)]
        commands += [_command(b"GET", key) for key in raw]
        commands.append(_command(b"EXEC"))
        self._send(b"".join(commands))

    def window_lengths(self, n: int) -> list[int]:
        """The lengths a `send_window` of `n` keys read; its bulk replies come next."""
        for _ in range(n + 2):  # MULTI's OK, then QUEUED for the EVALSHA and each GET
            self._simple()
        line = self._simple()
        if line != b"*%d" % (n + 1):
            raise Unavailable(f"Redis at {self._shown} sent {line[:20]!r} for a transaction")
        lengths = self.integers()
        if len(lengths) != n:
            raise Unavailable(f"Redis at {self._shown} sent {len(lengths)} lengths for {n} keys")
        return lengths

    def script(self, body: str, keys: Sequence[str]) -> list[int]:
        """EVALSHA of `body` over `keys` (loading it once per connection, and again after a
        Redis restart forgot it)."""
        sha = self._shas.get(body)
        if sha is None:
            sha = self._shas[body] = hashlib.sha1(body.encode()).hexdigest().encode()
            self._scripts[sha] = body.encode()
        args = [key.encode() for key in keys]
        call = _command(b"EVALSHA", sha, str(len(args)).encode(), *args)
        self._send(call)
        try:
            return self.integers()
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        self._send(_command(b"SCRIPT", b"LOAD", self._scripts[sha]) + call)
        self._simple(), self._line()  # the sha, a bulk reply: its length, then itself
        return self.integers()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc

    def set_deadline(self, seconds: float) -> None:
        set_timeouts(self._sock, min(seconds, self._timeout_s))
        self._armed_at = time.monotonic()

    def rearm(self, deadline: float) -> None:
        """`set_deadline` to what `deadline` (monotonic) leaves, unless it was set less than
        REARM_S ago. A call sets its deadline once first: the last one may be another call's."""
        now = time.monotonic()
        if now - self._armed_at >= REARM_S:
            self.set_deadline(deadline - now)

    def close(self) -> None:
        self._sock.close()
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
