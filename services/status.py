"""The one mapping between kvpool's exception tree and gRPC status codes, both ways.

Servers: install `ErrorInterceptor` and let servicers raise `kvpool.errors` exceptions (or
`ValueError` for caller mistakes); the interceptor aborts the call with the matching code and the
exception's message. Anything else is a bug: it is logged with its traceback and the caller gets
INTERNAL with no internals in the message. An optional observer sees every finished call's method,
code and duration, which is how metrics hook in without each servicer timing itself. A request
whose bytes do not parse as its message is answered INVALID_ARGUMENT (grpcio alone says INTERNAL).

Clients: `error_from_rpc` turns a `grpc.RpcError` back into the matching exception, so callers
catch `kvpool.errors.Unavailable` (and friends) instead of inspecting status codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from kvpool import errors

log = logging.getLogger(__name__)

# Order matters: the first class an exception is an instance of wins (InvalidArgument is also a
# ValueError, so it must come before the plain ValueError catch-all for caller mistakes).
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)

_ERRORS: dict[grpc.StatusCode, type[errors.KvpoolError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    # A deadline is the caller's own patience running out; to the caller the peer is unavailable.
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}

# (full method name, final status code, seconds from call start to the end of the response)
CallObserver = Callable[[str, grpc.StatusCode, float], None]


def code_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for an exception a servicer raised on purpose, or None for a bug."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return None


def error_from_rpc(err: grpc.RpcError, what: str) -> errors.KvpoolError:
    """The kvpool exception for a failed call; `what` names the call for the message.

    Codes outside the tree (INTERNAL, UNKNOWN, CANCELLED, ...) become the base `KvpoolError`, so
    a caller that treats any store failure as a miss catches `KvpoolError`.
    """
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    cls = _ERRORS.get(code, errors.KvpoolError)
    return cls(f"{what}: {code.name}: {details}")


def retry_pushback_s(err: grpc.RpcError) -> float | None:
    """The seconds a server asked its client to wait before retrying (`grpc-retry-pushback-ms`)."""
    if not isinstance(err, grpc.Call):
        return None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


def _finish(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    """End the call with the status for `exc`; `context.abort` raises, so this never returns."""
    code = code_for(exc)
    if code is not None:
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:  # gRPC's name for "do not retry before this"
            context.set_trailing_metadata(
                (("grpc-retry-pushback-ms", str(int(retry_after_s * 1000))),)
            )
        context.abort(code, str(exc))
    existing = context.code()  # the servicer called context.abort itself
    if existing is not None and existing != grpc.StatusCode.OK:
        raise exc
    log.exception("unexpected error in a gRPC handler", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error (details are in the server log)")


class _Undecodable:
    """Stands in for a request message that could not be parsed.

    grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception
    deserializing request!"), which blames the server for the caller's bytes. The interceptor
    installs a deserializer that returns this instead of raising, and the handler wrappers turn
    it into InvalidArgument, so the caller gets INVALID_ARGUMENT and metrics count it as such.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever a custom parser raises
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _parsed(request: Any, streaming: bool) -> Any:
    """`request` (or, for a client stream, an iterator of them), refusing undecodable ones."""
    if streaming:
        return (_parsed(item, False) for item in request)
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid message: {request.reason}")
    return request


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions from every handler to status codes and reports each finished call."""

    def __init__(self, observer: CallObserver | None = None) -> None:
        self._observer = observer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        deserialize = handler.request_deserializer
        # Raw-bytes handlers (no deserializer) cannot see an undecodable message.
        check = None if deserialize is None else handler.request_streaming
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            wrapped = self._wrap_stream(method, inner, check)
        else:
            inner = handler.unary_unary or handler.stream_unary
            wrapped = self._wrap_unary(method, inner, check)
        return handler._replace(
            request_deserializer=None if deserialize is None else _tolerant(deserialize),
            unary_unary=wrapped if handler.unary_unary else None,
            stream_unary=wrapped if handler.stream_unary else None,
            unary_stream=wrapped if handler.unary_stream else None,
            stream_stream=wrapped if handler.stream_stream else None,
        )

    def _observe(self, method: str, context: grpc.ServicerContext, start: float) -> None:
        if self._observer is not None:
            code = context.code() or grpc.StatusCode.OK
            self._observer(method, code, time.perf_counter() - start)

    def _wrap_unary(
        self, method: str, inner: Callable[..., Any], check: bool | None
    ) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                if check is not None:
                    request = _parsed(request, check)
                return inner(request, context)
            except Exception as exc:
                _finish(context, exc)
            finally:
                self._observe(method, context, start)

        return call

    def _wrap_stream(
        self, method: str, inner: Callable[..., Any], check: bool | None
    ) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                if check is not None:
                    request = _parsed(request, check)
                yield from inner(request, context)
            except GeneratorExit:
                # The client went away or the server is stopping: gRPC closes the generator.
                if context.code() is None:
                    context.set_code(grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                _finish(context, exc)
            finally:
                self._observe(method, context, start)

        return call
