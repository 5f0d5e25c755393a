"""A raw RESP connection to one Redis for the data path: values move from Redis's socket to the
client's without the store parsing them (docs/store.md, "The data path").

redis-py reads every reply into a Python `bytes`; here a Get reads only each bulk reply's
`$len\\r\\n` head and then moves `len` bytes from the Redis socket to the client socket with
`os.splice` through a pipe (Linux: the kernel moves them, no copy into Python), or with
`recv_into` and `sendall` of one reused buffer where splice is missing. One `RespStream` per data
path connection, opened on its first request; Redis only ever sees GET, EVALSHA and the
handshake. TLS Redis (`rediss://`) has no raw stream: the data path then reads through the
backend (`RedisStore.get_many`), as gRPC does.
"""

import hashlib
import os
import socket
import struct
from collections.abc import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from kvpool.errors import InvalidArgument, PermissionDenied, Unavailable

_SPLICE = hasattr(os, "splice")
_PIPE_BYTES = 1 << 20  # the most Linux gives an unprivileged pipe (/proc/sys/fs/pipe-max-size)
_BOUNCE_BYTES = 256 << 10
_F_SETPIPE_SZ = 1031
_HEAD_READ_BYTES = 4096


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
        scripts: tuple[str, str],
    ) -> None:
        """`scripts`: the backend's Lookup and sizes scripts (backends/redis.py)."""
        self._lookup_script, self._sizes_script = scripts
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

    def bulk_length(self) -> int | None:
        """The length of the next bulk reply (a GET's), None for a missing key."""
        line = self._simple()
        if line[:1] != b"$":
            raise Unavailable(f"Redis at {self._shown} sent {line[:20]!r} for a bulk reply")
        n = int(line[1:])
        return None if n < 0 else n

    def integers(self) -> list[int]:
        """An array reply of integers (a script's), or one integer reply as a list of one."""
        line = self._simple()
        if line[:1] == b":":
            return [int(line[1:])]
        if line[:1] != b"*":
            raise Unavailable(f"Redis at {self._shown} sent {line[:20]!r} for an array")
        return [int(self._simple()[1:]) for _ in range(int(line[1:]))]

    def move(self, n: int, out: socket.socket) -> None:
        """Send the next `n` payload bytes (and eat their CRLF) to `out`, untouched."""
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
        while len(self._buf) < 2:
            self._fill()
        if self._buf[:2] != b"\r\n":
            raise Unavailable(f"Redis at {self._shown} sent a bulk reply without its CRLF")
        del self._buf[:2]

    def _splice(self, left: int, out: socket.socket) -> None:
        if self._pipe is None:
            self._pipe = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe only means more calls
        read_end, write_end = self._pipe
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

    def _copy(self, left: int, out: socket.socket) -> None:
        if self._bounce is None:
            self._bounce = memoryview(bytearray(_BOUNCE_BYTES))
        while left:
            try:
                got = self._sock.recv_into(self._bounce, min(left, _BOUNCE_BYTES))
            except OSError as exc:
                raise Unavailable(f"Redis at {self._shown} failed (data path): {exc}") from exc
            if not got:
                raise Unavailable(f"Redis at {self._shown} closed the connection inside a value")
            out.sendall(self._bounce[:got])
            left -= got

    # --- commands ----------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> int:
        return self.script(self._lookup_script, keys)[0]

    def sizes(self, keys: Sequence[str]) -> list[int]:
        return self.script(self._sizes_script, keys)

    def send_gets(self, keys: Sequence[str]) -> None:
        self._send(b"".join(_command(b"GET", key.encode()) for key in keys))

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

    def close(self) -> None:
        self._sock.close()
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
