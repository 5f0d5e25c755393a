"""The HTTP API's connections: how many one peer may hold, and how long one may idle.

uvicorn alone let 260 connections that sent nothing, or trickled partial headers, fill its
connection cap (`limit_concurrency`), after which every request, `/health` included, got 503 for
as long as the sockets stayed open: it has no deadline for a request's headers, and its
keep-alive timer is cancelled by any byte a client sends. `GuardedH11Protocol` is uvicorn's h11
protocol with three more rules:

- headers in time: from a connection's start, and from the end of each response, the next
  request's headers must be complete within `header_timeout_s`, however the bytes trickle in;
  past it the connection gets 408 and is closed;
- connections per peer: a peer address holds at most `max_per_peer` connections (0: no limit);
  a connection past it gets 503 naming the limit and is closed before any byte is read;
- a backstop on every peer's connections together (`max_total`), above any one peer's share.

No cap counts requests in flight, so `/health` (which needs neither a thread nor a tenant's
quota) answers while any peer's connections idle. An idle connection between requests is closed
after uvicorn's `timeout_keep_alive`.
"""

import asyncio
import logging
import threading
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class PeerConnections:
    """Open connections per peer address, with a cap per peer and one for all."""

    def __init__(self, max_per_peer: int, max_total: int) -> None:
        if max_per_peer < 0 or max_total < 0:
            raise ValueError(
                f"max_per_peer and max_total must be >= 0 (0: no limit), got {max_per_peer} and "
                f"{max_total}"
            )
        self.max_per_peer = max_per_peer
        self.max_total = max_total
        self._open: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def enter(self, peer: str) -> str | None:
        """Count a new connection of `peer`; None when admitted, else why it is refused."""
        with self._lock:
            held = self._open.get(peer, 0)
            if self.max_per_peer and held >= self.max_per_peer:
                return (
                    f"{peer} already has {held} connections open (limit "
                    f"--max-connections-per-peer={self.max_per_peer})"
                )
            if self.max_total and self._total >= self.max_total:
                return f"the server has {self._total} connections open (limit {self.max_total})"
            self._open[peer] = held + 1
            self._total += 1
            return None

    def leave(self, peer: str) -> None:
        with self._lock:
            held = self._open.get(peer, 0) - 1
            if held > 0:
                self._open[peer] = held
            else:
                self._open.pop(peer, None)
            self._total = max(0, self._total - 1)

    def open(self, peer: str) -> int:
        with self._lock:
            return self._open.get(peer, 0)


def _response(status: str, message: str) -> bytes:
    body = message.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a header deadline and a per-peer connection count.

    Use `guarded_protocol` to make one bound to a server's table and deadline.
    """

    table: PeerConnections
    header_timeout_s: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None  # set once the connection is counted
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else "unknown"
        refused = self.table.enter(peer)
        if refused is not None:
            log.warning("refusing an HTTP connection: %s", refused)
            transport.write(_response("503 Service Unavailable", refused + "\n"))
            transport.close()
            return
        self._peer = peer
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._peer is not None:
            self.table.leave(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are complete
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's headers, however they trickle in

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        if self.header_timeout_s:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered: its headers came in time
        self.transport.write(
            _response(
                "408 Request Timeout",
                f"no complete request headers within {self.header_timeout_s:g} s "
                "(limit --http-header-timeout)\n",
            )
        )
        self.transport.close()


def guarded_protocol(table: PeerConnections, header_timeout_s: float) -> type[H11Protocol]:
    """A `GuardedH11Protocol` class bound to `table` and `header_timeout_s`, for uvicorn's
    `Config(http=...)`."""
    return type(
        "BoundGuardedH11Protocol",
        (GuardedH11Protocol,),
        {"table": table, "header_timeout_s": header_timeout_s},
    )
