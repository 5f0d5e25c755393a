"""A gRPC server with what every kvpool service needs: health, reflection, limits, shutdown.

`GrpcServer` hosts one or more services (each given as its full name and a function that adds it
to a `grpc.Server`), plus:

- the standard health service (`grpc.health.v1.Health`), SERVING for "" and each service once
  started, NOT_SERVING as soon as a shutdown begins, so load balancers stop sending work;
- server reflection for the services and health, so `grpcurl` works without .proto files;
- message size limits on both directions, and SO_REUSEPORT off, so a second server on a busy port
  fails loudly instead of silently sharing it;
- optional bearer tokens (`authorization: Bearer <token>` metadata, `services.auth.TokenTable`)
  checked on every call, unary and streaming, except health checks, answered UNAUTHENTICATED;
- optional TLS (`services.auth.ServerTls`);
- limits on calls and connections (`services.watchdog.ConnectionLimits`): a server-side cap on
  call time, idle streams cancelled, keepalive, connection idle time and age, a bounded queue of
  calls waiting for a handler thread;
- graceful shutdown: `stop(grace_s)` rejects new calls and lets in-flight ones finish for up to
  `grace_s` seconds. `run_until_signal` does that on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpool.errors import Unavailable
from services.auth import ServerTls, TokenTable, request_authorization
from services.watchdog import CallWatchdog, ConnectionLimits

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One service to host: its full proto name and how to add its servicer to a server."""

    name: str  # e.g. "kvpool.v1.KVStore"
    register: Callable[[grpc.Server], None]


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options that bound message sizes (the same keys work on both ends)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose `authorization` metadata holds no accepted token (health is exempt)."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return continuation(details)
        sent = request_authorization(details.invocation_metadata)
        if self._tokens.tenant_for(sent) is not None:
            return continuation(details)
        handler = continuation(details)
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if sent is None
            else "bearer token not accepted"
        )

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Answer in the shape of the real method, so streaming clients get the status cleanly. An
        # unknown method gets UNAUTHENTICATED too: UNIMPLEMENTED would tell a caller without a
        # token which methods exist.
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(deny)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


class GrpcServer:
    """A started-on-demand gRPC server; `port` is the bound port (useful with port 0)."""

    def __init__(
        self,
        services: Sequence[ServiceSpec],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 16,
        max_message_bytes: int = 8 << 20,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        auth: TokenTable | None = None,
        tls: ServerTls | None = None,
        reuse_port: bool = False,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self._services = list(services)
        self._address = f"{host}:{port}"
        self._health = health.HealthServicer(experimental_non_blocking=True)
        limits = limits or ConnectionLimits()
        self._watchdog = CallWatchdog(limits)
        chain = [*interceptors, self._watchdog]
        if auth is not None:
            # Last, so the interceptors before it (errors, metrics) see refused calls too.
            chain.append(BearerTokenInterceptor(auth))
        self._tls = tls
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            interceptors=chain,
            # so_reuseport is off by default, so a second server on a port in use fails instead
            # of sharing it; the store's processes share one port on purpose (store/processes).
            options=[
                *message_options(max_message_bytes),
                ("grpc.so_reuseport", int(reuse_port)),
                *limits.server_options(),
            ],
            maximum_concurrent_rpcs=max_workers + limits.max_queued_rpcs,
        )
        self._port = 0
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> int:
        """Bind, start serving, mark every service SERVING; returns the bound port."""
        for spec in self._services:
            spec.register(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [spec.name for spec in self._services]
        reflection.enable_server_reflection(
            (*names, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server
        )
        try:
            if self._tls is None:
                self._port = self._server.add_insecure_port(self._address)
            else:
                self._port = self._server.add_secure_port(self._address, self._tls.credentials())
        except RuntimeError as exc:  # grpc raises when the address cannot be bound
            raise Unavailable(f"cannot listen on {self._address}: {exc}") from exc
        if self._port == 0:
            raise Unavailable(f"cannot listen on {self._address}: address in use or not permitted")
        self._server.start()
        self._watchdog.start()
        for name in ("", *names):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d", ", ".join(names), self._port)
        return self._port

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls run up to `grace_s`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._end_health_watches()
        self._server.stop(grace_s).wait()
        self._watchdog.stop()

    def _end_health_watches(self) -> None:
        """End open health Watch streams once they have been sent NOT_SERVING.

        A Watch never ends by itself, so each open one would hold `stop` for the whole grace
        period. grpcio-health-checking has no public way to end them; without its (private)
        callback table this is a no-op and shutdown just takes the grace period.
        """
        health = self._health
        table = getattr(health, "_send_response_callbacks", None)
        lock = getattr(health, "_lock", None)
        if not isinstance(table, dict) or lock is None:
            return
        with lock:
            callbacks = [callback for group in table.values() for callback in list(group)]
        for callback in callbacks:
            callback(None)  # None ends a non-blocking server stream

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped (or the timeout passes); True when stopped."""
        return not self._server.wait_for_termination(timeout_s)


def run_until_signal(
    stop: Callable[[], None], *, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> None:
    """Block the main thread until one of `signals` arrives, then call `stop` and return."""
    received = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        received.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    try:
        # A timed wait keeps the main thread returning to the interpreter, where handlers run.
        while not received.wait(0.5):
            pass
        stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
