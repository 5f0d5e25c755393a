"""A gRPC server on `grpc.aio`, in a thread of its own, where one caller's idle, slow or unread
calls cost that caller a slot of its own quota and nobody else anything.

The synchronous server (`services.grpc_server`) gives every call a handler thread from one fixed
pool, from the moment the call opens: a caller who opens calls and never sends the request
message, or never reads the response stream, holds those threads, and once they are all held
every other caller waits. Here a call waiting on its peer holds no thread (it is a coroutine
waiting on the network), and four limits bound what it may hold instead (`CallerLimits`):

- each call has `request_timeout_s` to send its request message; a call that sends none is
  answered DEADLINE_EXCEEDED (unary-request methods are read as streams for this, so the wait
  for the message is ours to bound, not grpcio's);
- a response stream that cannot be written for `idle_s` (its client does not read, so HTTP/2
  flow control holds the write) is cancelled, and so is a request stream that sends nothing for
  `idle_s`: the handler's generator is closed, which for a generation cancels it on its worker;
- each caller (the tenant its bearer token acts for, or its peer address when auth is off) has
  at most `max_calls_per_caller` calls open; more are answered RESOURCE_EXHAUSTED at once, with
  the limit in the message. The count is a `CallerQuota`, which another front of the same service
  (the gateway's HTTP API) may share;
- every caller together has at most `max_calls` open, a backstop on memory; no one caller can
  reach it, since it is well above any caller's own share.

Besides: health (`grpc.health.v1`, no auth, SERVING until `stop`), reflection (behind auth),
bearer tokens checked at the start of each call (the caller's token decides its quota, before
any byte of the request is read), TLS, message size limits, keepalive and connection age
(`ConnectionLimits`), the error tree mapped to status codes (`services.status.code_for`), an
observer of each finished call (metrics), and graceful shutdown: `stop(grace_s)` sets
NOT_SERVING, ends health watches, refuses new calls and lets calls in flight finish for up to
`grace_s`.

Servicers are written with `async def`; a servicer that calls blocking code (Ray, a tokenizer)
steps it in threads, bounded by its own limiter, so the event loop never blocks.

    server = AioGrpcServer([ServiceSpec("kvpool.v1.Inference", register)], auth=tokens)
    port = server.start()      # bound and serving when it returns
    server.stop(grace_s=30)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpool import errors
from kvpool.errors import Unavailable
from services.auth import ServerTls, TokenTable, request_authorization
from services.grpc_server import HEALTH_SERVICE, ServiceSpec, message_options
from services.quota import CallerQuota, caller_key
from services.status import CallObserver, code_for
from services.watchdog import ConnectionLimits

log = logging.getLogger(__name__)

_HEALTH_PREFIX = f"/{HEALTH_SERVICE}/"
_WATCH = f"/{HEALTH_SERVICE}/Watch"
_INTERNAL = "internal error (details are in the server log)"


@dataclass(frozen=True, slots=True)
class CallerLimits:
    """What one caller's calls may hold, and how long a call may wait on its peer."""

    request_timeout_s: float = 10.0  # to receive a call's request message (0: no limit)
    max_calls_per_caller: int = 32  # calls one caller has open at once (0: no limit)
    max_calls: int = 4096  # calls every caller together has open (0: no limit)

    def __post_init__(self) -> None:
        for name in ("request_timeout_s", "max_calls_per_caller", "max_calls"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")

    def server_options(self) -> list[tuple[str, int]]:
        """A connection that has not finished its HTTP/2 handshake within `request_timeout_s` is
        closed too (gRPC's own default waits 120 s): an open socket that sends nothing is an
        idle call without a call."""
        if not self.request_timeout_s:
            return []
        return [("grpc.server_handshake_timeout_ms", int(self.request_timeout_s * 1000))]


def peer_host(peer: str) -> str:
    """`ipv4:10.0.0.7:51234` -> `10.0.0.7`, `ipv6:[::1]:5000` -> `::1`: a caller is a host."""
    _, _, address = peer.partition(":")
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.rpartition(":")[0] or address


class _Undecodable:
    """A request whose bytes did not parse: answered INVALID_ARGUMENT, not grpcio's INTERNAL."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom parser raises
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid message: {request.reason}")
    return request


class _Guard(grpc.aio.ServerInterceptor):
    """Wraps every method: auth, the caller's quota, the request deadline, idle streams, errors.

    Every handler is served in its streaming-request form, so reading the request message is
    done here, with a deadline. The quota is taken before that read and given back when the
    call ends, however it ends.
    """

    def __init__(
        self,
        quota: CallerQuota,
        limits: CallerLimits,
        connection: ConnectionLimits,
        auth: TokenTable | None,
        observer: CallObserver | None,
    ) -> None:
        self._quota = quota
        self._limits = limits
        self._idle_s = connection.idle_s
        self._max_call_s = connection.max_call_s
        self._auth = auth
        self._observer = observer
        self.watches: set[asyncio.Task[Any]] = set()  # health Watch streams, ended on stop

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        health = method.startswith(_HEALTH_PREFIX)
        tenant: str | None = None
        refusal: errors.KvpoolError | None = None
        if self._auth is not None and not health:
            sent = request_authorization(details.invocation_metadata)
            tenant = self._auth.tenant_for(sent)
            if tenant is None:
                refusal = errors.Unauthenticated(
                    "missing bearer token: send metadata 'authorization: Bearer <token>'"
                    if sent is None
                    else "bearer token not accepted"
                )
        if handler is None:
            # An unknown method: UNAUTHENTICATED for a caller without a token (UNIMPLEMENTED
            # would tell it which methods exist), UNIMPLEMENTED for everyone else.
            if refusal is None:
                return None  # type: ignore[return-value]
            # Not observed: an unknown method's name would be a label anyone could add.
            return grpc.stream_stream_rpc_method_handler(self._refuse(None, refusal))
        if refusal is not None:
            return _same_shape(handler, self._refuse(method, refusal))
        call = _Call(self, method, handler, tenant, watch=method == _WATCH)
        # Unary responses are returned from the coroutine, streamed ones written by it.
        served = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return served(
            call.serve,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _refuse(self, method: str | None, refusal: errors.KvpoolError) -> Callable[..., Any]:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            if method is not None:
                self.observe(method, grpc.StatusCode.UNAUTHENTICATED, time.perf_counter())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(refusal))

        return refuse

    def observe(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._observer is not None:
            self._observer(method, code, time.perf_counter() - started)


def _same_shape(handler: grpc.RpcMethodHandler, fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind running `fn`, so a client of any kind gets its status."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(fn)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(fn)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(fn)
    return grpc.unary_unary_rpc_method_handler(fn)


class _Call:
    """One method's guarded handler; `serve` runs once per call."""

    def __init__(
        self,
        guard: _Guard,
        method: str,
        handler: grpc.RpcMethodHandler,
        tenant: str | None,
        *,
        watch: bool,
    ) -> None:
        self.guard = guard
        self.method = method
        self.handler = handler
        self.tenant = tenant
        self.watch = watch
        self.inner = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )

    async def serve(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        guard = self.guard
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        caller = caller_key(self.tenant, peer_host(context.peer()))
        try:
            guard._quota.enter(caller)
        except errors.ResourceExhausted as exc:
            guard.observe(self.method, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        task = asyncio.current_task()
        if self.watch and task is not None:
            guard.watches.add(task)
        try:
            if not guard._max_call_s:
                return await self._run(requests, context)
            async with asyncio.timeout(guard._max_call_s) as clock:
                try:
                    return await self._run(requests, context)
                except asyncio.CancelledError:
                    if clock.expired():
                        raise _Idle(
                            f"the call ran past the server's limit of {guard._max_call_s:g} s",
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                        ) from None
                    raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN  # the handler aborted itself
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away, or the server is stopping
            raise
        except _Idle as idle:
            code = idle.code
            await context.abort(code, str(idle))
        except Exception as exc:
            found = code_for(exc)
            if found is None:
                log.error("unexpected error in a gRPC handler", exc_info=exc)
                code, message = grpc.StatusCode.INTERNAL, _INTERNAL
            else:
                code, message = found, str(exc)
                retry_after_s = getattr(exc, "retry_after_s", None)
                if retry_after_s is not None:  # gRPC's name for "do not retry before this"
                    context.set_trailing_metadata(
                        (("grpc-retry-pushback-ms", str(int(retry_after_s * 1000))),)
                    )
            await context.abort(code, message)
        finally:
            guard._quota.leave(caller)
            if task is not None:
                guard.watches.discard(task)
            guard.observe(self.method, code, started)

    async def _run(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        handler = self.handler
        if handler.request_streaming:
            request: Any = self._stream_of(requests)
        else:
            request = _checked(await self._first(requests))
        if not handler.response_streaming:
            return await self.inner(request, context)
        out = self.inner(request, context)
        if not hasattr(out, "__aiter__"):
            return await out  # a handler that writes with context.write itself
        try:
            async for response in out:
                await self._write(context, response)
        finally:
            await out.aclose()  # runs the handler's cleanup now: a generation stops on its worker
        return None

    async def _first(self, requests: AsyncIterator[Any]) -> Any:
        limit = self.guard._limits.request_timeout_s
        try:
            if limit:
                return await asyncio.wait_for(anext(requests), limit)
            return await anext(requests)
        except TimeoutError:
            raise _Idle(
                f"no request message within {limit:g} s of the call's start (limit "
                "--request-timeout); send the request when the call opens",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except StopAsyncIteration:
            raise errors.InvalidArgument("the call ended before its request message") from None

    async def _stream_of(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        idle_s = self.guard._idle_s
        while True:
            try:
                if idle_s:
                    item = await asyncio.wait_for(anext(requests), idle_s)
                else:
                    item = await anext(requests)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise _Idle(
                    f"the stream sent nothing for {idle_s:g} s (limit --idle-timeout)",
                    grpc.StatusCode.CANCELLED,
                ) from None
            yield _checked(item)

    async def _write(self, context: grpc.aio.ServicerContext, response: Any) -> None:
        idle_s = self.guard._idle_s
        if not idle_s or self.watch:
            await context.write(response)
            return
        try:
            await asyncio.wait_for(context.write(response), idle_s)
        except TimeoutError:
            raise _Idle(
                f"the stream was not read for {idle_s:g} s (limit --idle-timeout); it was "
                "cancelled",
                grpc.StatusCode.CANCELLED,
            ) from None


class _Idle(Exception):
    """A call cancelled because its peer kept it waiting past a limit."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class AioGrpcServer:
    """A `grpc.aio` server on an event loop in its own thread; `port` is the bound port.

    `register` functions of its `ServiceSpec`s receive the `grpc.aio.Server` (the generated
    `add_*Servicer_to_server` functions accept it). `quota` may be shared with another front of
    the same service, so a caller's calls count once across both.
    """

    def __init__(
        self,
        services: Sequence[ServiceSpec],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = 8 << 20,
        auth: TokenTable | None = None,
        tls: ServerTls | None = None,
        limits: ConnectionLimits | None = None,
        callers: CallerLimits | None = None,
        quota: CallerQuota | None = None,
        observer: CallObserver | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._services = list(services)
        self._address = f"{host}:{port}"
        self._auth = auth
        self._tls = tls
        self._limits = limits or ConnectionLimits()
        self._callers = callers or CallerLimits()
        self.quota = quota or CallerQuota(
            self._callers.max_calls_per_caller, self._callers.max_calls
        )
        self._observer = observer
        self._max_message_bytes = max_message_bytes
        self._reuse_port = reuse_port
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: aio_health.HealthServicer | None = None
        self._guard: _Guard | None = None
        self._stopped = threading.Event()
        self._terminated = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the server has not started")
        return self._loop

    def start(self, timeout_s: float = 30.0) -> int:
        """Bind, start serving, mark every service SERVING; returns the bound port."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="grpc-aio", daemon=True
        )
        self._thread.start()
        try:
            self._port = asyncio.run_coroutine_threadsafe(self._start(), loop).result(timeout_s)
        except BaseException:
            self._shut_loop()
            raise
        return self._port

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()
            self._terminated.set()

    async def _start(self) -> int:
        self._guard = _Guard(self.quota, self._callers, self._limits, self._auth, self._observer)
        server = grpc.aio.server(
            interceptors=[self._guard],
            options=[
                *message_options(self._max_message_bytes),
                ("grpc.so_reuseport", int(self._reuse_port)),
                *self._limits.server_options(),
                *self._callers.server_options(),
            ],
        )
        self._server = server
        for spec in self._services:
            spec.register(server)  # type: ignore[arg-type]
        self._health = aio_health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [spec.name for spec in self._services]
        reflection.enable_server_reflection(
            (*names, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        try:
            if self._tls is None:
                port = server.add_insecure_port(self._address)
            else:
                port = server.add_secure_port(self._address, self._tls.credentials())
        except RuntimeError as exc:  # grpc raises when the address cannot be bound
            raise Unavailable(f"cannot listen on {self._address}: {exc}") from exc
        if port == 0:
            raise Unavailable(f"cannot listen on {self._address}: address in use or not permitted")
        await server.start()
        for name in ("", *names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d", ", ".join(names), port)
        return port

    def stop(self, grace_s: float) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight calls run up to `grace_s`."""
        if self._stopped.is_set() or self._loop is None:
            return
        self._stopped.set()
        try:
            asyncio.run_coroutine_threadsafe(self._stop(grace_s), self._loop).result(grace_s + 30.0)
        finally:
            self._shut_loop()

    async def _stop(self, grace_s: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._guard is not None and self._guard.watches:
            # A Watch never ends by itself and would hold stop for the whole grace period:
            # end each once it has had a moment to send NOT_SERVING.
            await asyncio.sleep(0.05)
            for task in list(self._guard.watches):
                task.cancel()
        if self._server is not None:
            await self._server.stop(grace_s)

    def _shut_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped (or the timeout passes); True when stopped."""
        return self._terminated.wait(timeout_s)
