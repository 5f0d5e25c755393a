"""Server-side limits on calls and connections, so a slow or idle client cannot hold a server.

gRPC's sync server runs each call on a handler thread. A client that opens a stream and then
neither sends (Put) nor reads (Get, Generate: a send blocks once HTTP/2 flow control fills)
holds that thread for as long as it likes, and one without a deadline holds it forever. Enough of
them and every other caller waits. `ConnectionLimits` bounds that four ways:

- `max_call_s`: no call runs longer, whatever deadline its client set (0: no server cap);
- `idle_s`: a stream that waits on its peer (for the next request message, or for room to send
  the next response message) this long is cancelled;
- keepalive pings, a maximum connection idle time and age: dead peers and forgotten connections
  are closed by the server;
- `max_queued_rpcs`: calls beyond the handler threads wait in a bounded queue; past it they get
  RESOURCE_EXHAUSTED at once (`maximum_concurrent_rpcs`).

`CallWatchdog` is the interceptor that enforces the first two: one thread for the whole server
checks the open calls a few times a second and cancels those past their limit.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from kvpool.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_call_s: float = 0.0  # 0: only the client's deadline
    idle_s: float = 30.0  # 0: streams may wait on their peer forever
    keepalive_s: float = 60.0  # ping an idle connection this often
    keepalive_timeout_s: float = 20.0  # and close it when the ping is not answered in time
    max_connection_idle_s: float = 600.0  # close a connection without calls after this long
    max_connection_age_s: float = 3600.0  # then ask clients to reconnect (GOAWAY)...
    max_connection_age_grace_s: float = 120.0  # ...and close it when its calls outlive this
    max_queued_rpcs: int = 64  # calls waiting for a handler thread; more: RESOURCE_EXHAUSTED
    # Bytes gRPC may buffer per stream ahead of the handler. 0: gRPC's default, a window grown by
    # bandwidth-delay probing, which on a busy machine reached tens of MiB per stream, memory no
    # budget saw. A fixed 1 MiB still moves 1 GB/s per stream over a 1 ms round trip.
    stream_window_bytes: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_call_s",
            "idle_s",
            "keepalive_s",
            "keepalive_timeout_s",
            "max_connection_idle_s",
            "max_connection_age_s",
            "max_connection_age_grace_s",
            "max_queued_rpcs",
            "stream_window_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC core options for keepalive and connection idle time and age."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        options = [
            ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # Clients may ping as often as we do without being told off (GOAWAY too_many_pings).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.stream_window_bytes:
            options.append(("grpc.http2.bdp_probe", 0))
            options.append(("grpc.http2.lookahead_bytes", self.stream_window_bytes))
        if self.max_connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)))
        if self.max_connection_age_s:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_s)))
            options.append(
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s))
            )
        return options


class _Call:
    __slots__ = ("cancelled", "context", "deadline", "method", "waiting_since")

    def __init__(self, context: grpc.ServicerContext, deadline: float, method: str) -> None:
        self.context = context
        self.deadline = deadline
        self.waiting_since: float | None = None  # set while waiting on the peer
        self.cancelled = ""  # why the watchdog cancelled it
        self.method = method


class CallWatchdog(grpc.ServerInterceptor):
    """Cancels calls that run past `max_call_s` or wait on their peer longer than `idle_s`."""

    def __init__(self, limits: ConnectionLimits, *, interval_s: float = 0.2) -> None:
        self._limits = limits
        self._interval_s = interval_s
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return bool(self._limits.max_call_s or self._limits.idle_s)

    def start(self) -> None:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="call-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            now = time.monotonic()
            with self._lock:
                calls = list(self._calls.values())
            for c in calls:
                waiting = c.waiting_since
                if c.cancelled:
                    continue
                if now >= c.deadline:
                    c.cancelled = f"ran past the server's limit of {self._limits.max_call_s:g} s"
                elif (
                    self._limits.idle_s
                    and waiting is not None
                    and now - waiting >= self._limits.idle_s
                ):
                    c.cancelled = f"waited on its peer for more than {self._limits.idle_s:g} s"
                else:
                    continue
                log.info("cancelling %s: it %s", c.method, c.cancelled)
                c.context.cancel()

    # --- wrapping handlers ---------------------------------------------------------------------

    def _enter(self, context: grpc.ServicerContext, method: str) -> tuple[int, _Call]:
        cap = self._limits.max_call_s
        deadline = time.monotonic() + cap if cap else float("inf")
        call = _Call(context, deadline, method)
        key = next(self._ids)
        with self._lock:
            self._calls[key] = call
        return key, call

    def _leave(self, key: int) -> None:
        with self._lock:
            self._calls.pop(key, None)

    @staticmethod
    def _requests(requests: Iterator[Any], call: _Call) -> Iterator[Any]:
        while True:
            call.waiting_since = time.monotonic()
            try:
                item = next(requests)
            except StopIteration:
                return
            except grpc.RpcError:
                if call.cancelled:
                    raise Unavailable(f"the call was cancelled: it {call.cancelled}") from None
                raise
            finally:
                call.waiting_since = None
            yield item

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        method = details.method
        if handler is None or not self.active or method.startswith("/grpc.health.v1.Health/"):
            return handler  # health Watch streams are meant to stay open
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            streaming_in = handler.stream_stream is not None

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                key, call = self._enter(context, method)
                try:
                    if streaming_in:
                        request = self._requests(request, call)
                    for response in inner(request, context):
                        call.waiting_since = time.monotonic()  # until gRPC has sent it
                        yield response
                        call.waiting_since = None
                finally:
                    self._leave(key)

            return handler._replace(
                unary_stream=stream if handler.unary_stream else None,
                stream_stream=stream if handler.stream_stream else None,
            )
        inner = handler.unary_unary or handler.stream_unary
        streaming_in = handler.stream_unary is not None

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            key, call = self._enter(context, method)
            try:
                if streaming_in:
                    request = self._requests(request, call)
                return inner(request, context)
            finally:
                self._leave(key)

        return handler._replace(
            unary_unary=unary if handler.unary_unary else None,
            stream_unary=unary if handler.stream_unary else None,
        )
