"""The OpenAI-compatible routes (Starlette), over the gateway's `InferenceCore`.

    POST /v1/chat/completions   POST /v1/completions   (streamed as server-sent events or not)
    GET  /v1/models             GET  /v1/models/{model}   GET /health

Like the gRPC servicer, this layer only converts: from OpenAI's JSON to a `GenerateCall`, from
the core's `Delta`/`Finished` items back to OpenAI's objects. Auth (bearer tokens and their
tenants), the limits and the error taxonomy are the gRPC API's; errors map to HTTP statuses in
`errors`. A request body is bounded (413 beyond `max_request_bytes`) and must arrive within
`body_timeout_s` (408). Each completion counts against its tenant's calls (`quota`, shared with
the gRPC front; 429 past `--max-calls-per-tenant`), from before its body is read to the end of
its response. Each generation holds one thread of a limiter shared by every HTTP stream
(`max_concurrent` of them; more wait).
"""

import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from anyio import CapacityLimiter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from kvpool.errors import NotFound, Unauthenticated, Unavailable
from services.auth import TokenTable, caller_tenant
from services.gateway.api import Delta, Finished
from services.gateway.core import InferenceCore
from services.gateway.http.bridge import CoreStream, unless_disconnected, wait_for_disconnect
from services.gateway.http.errors import (
    BAD_REQUEST,
    REQUEST_TIMEOUT,
    TOO_LARGE,
    ErrorKind,
    HttpError,
    error_body,
)
from services.gateway.http.metrics import UNMATCHED, HttpMetrics
from services.gateway.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    parse,
)
from services.quota import CallerQuota, caller_key

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def authenticate(authorization: str | None, auth: TokenTable | None) -> None:
    """Refuse a call without an accepted bearer token, in the gRPC interceptor's words."""
    if auth is None:
        return
    if authorization is None:
        raise Unauthenticated(
            "missing bearer token: send the header 'Authorization: Bearer <token>'"
        )
    if auth.tenant_for(authorization) is None:
        raise Unauthenticated("bearer token not accepted")


def error_response(exc: BaseException) -> Response:
    status, body = error_body(exc)
    return Response(body, status_code=status, media_type="application/json")


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApp:
    """The ASGI app: routes, plus the metrics of every request by route template."""

    def __init__(
        self,
        core: InferenceCore,
        *,
        model: str,
        auth: TokenTable | None = None,
        max_request_bytes: int = 4 << 20,
        max_concurrent: int = 64,
        serving: Callable[[], bool] = lambda: True,
        quota: CallerQuota | None = None,
        body_timeout_s: float = 10.0,
    ) -> None:
        self.core = core
        self.quota = quota
        self.body_timeout_s = body_timeout_s
        self.model = model
        self.auth = auth
        self.max_request_bytes = max_request_bytes
        self.serving = serving
        self.created = int(time.time())
        self.limiter = CapacityLimiter(max_concurrent)
        self.metrics = HttpMetrics(core.metrics.registry)
        self.routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model_card, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        self.app = Starlette(
            routes=self.routes, exception_handlers={HTTPException: self._routing_error}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what a client sees when the app fails before it answers

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe(self._route(scope), scope["method"], status, elapsed)

    def _route(self, scope: Scope) -> str:
        """The route template a request matched: a bounded label, never the raw path."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
        return UNMATCHED

    async def _routing_error(self, request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        what = "method not allowed:" if code == 405 else "no route"
        message = (
            f"{what} {request.method} {request.url.path}; this server has POST "
            "/v1/chat/completions, POST /v1/completions, GET /v1/models and GET /health"
        )
        kind = ErrorKind(code, "invalid_request_error" if code == 405 else "not_found_error")
        return error_response(HttpError(kind, message))

    # --- routes ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if not self.serving():
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def _card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "kvpool"}

    async def models(self, request: Request) -> Response:
        try:
            authenticate(request.headers.get("authorization"), self.auth)
        except Exception as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_card(self, request: Request) -> Response:
        try:
            authenticate(request.headers.get("authorization"), self.auth)
            self._check_model(request.path_params["model"])
        except Exception as exc:
            return error_response(exc)
        return JSONResponse(self._card())

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    # --- completions ---------------------------------------------------------------------

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        route = "/v1/chat/completions" if chat else "/v1/completions"
        caller: str | None = None
        try:
            authorization = request.headers.get("authorization")
            authenticate(authorization, self.auth)  # before reading a stranger's body
            if not self.serving():
                raise Unavailable("the gateway is shutting down; retry on another replica")
            caller = self._enter(authorization, request)
            body = await self._body(request)
            req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
            self._check_model(req.model)
            tenant = caller_tenant(req.kvpool.tenant, authorization, self.auth, "kvpool.tenant")
            call = req.generate_call(tenant)
        except ClientDisconnect:  # gone before its body was read (uvicorn reports that first)
            self._leave(caller)
            self.metrics.disconnects.labels(route).inc()
            return Response(status_code=499)
        except Exception as exc:
            self._leave(caller)
            return error_response(exc)
        shape = ResponseShape(chat, self.model, req.include_usage)
        cancelled = threading.Event()
        metrics = self.core.metrics
        metrics.in_flight.inc()
        stream = CoreStream(self.core.generate(call, cancelled), cancelled, self.limiter)
        handed_over = False
        try:
            if req.stream:
                # The first item decides the status: a limit or a bad prompt is still a 4xx.
                present, first = await unless_disconnected(request.receive, stream.next, cancelled)
                if not present or cancelled.is_set():
                    self.metrics.disconnects.labels(route).inc()
                    return Response(status_code=499)  # nobody is left to read it
                handed_over = True
                return _EventStream(
                    self._events(stream, first, shape), stream, self._on_stream_end(route, caller)
                )
            present, result = await unless_disconnected(
                request.receive, lambda: self._collect(stream), cancelled
            )
            # `cancelled` is set only by the disconnect watcher here: the stream may have ended
            # (cut short by that very cancel) just before the watcher's cancel reached us.
            if not present or result is None or cancelled.is_set():
                self.metrics.disconnects.labels(route).inc()
                return Response(status_code=499)
            text, finished = result
            return JSONResponse(shape.whole(text, finished))
        except Exception as exc:
            if cancelled.is_set():  # the stream ended unfinished because its client had left
                self.metrics.disconnects.labels(route).inc()
                return Response(status_code=499)
            return error_response(exc)
        finally:
            if not handed_over:
                await stream.close()
                metrics.in_flight.dec()
                self._leave(caller)

    def _enter(self, authorization: str | None, request: Request) -> str | None:
        """Count the call against its tenant (its peer with auth off); the key, to `_leave`."""
        if self.quota is None:
            return None
        tenant = None if self.auth is None else self.auth.tenant_for(authorization)
        key = caller_key(tenant, request.client.host if request.client else "unknown")
        self.quota.enter(key)  # ResourceExhausted (429) past --max-calls-per-tenant
        return key

    def _leave(self, caller: str | None) -> None:
        if caller is not None and self.quota is not None:
            self.quota.leave(caller)

    def _on_stream_end(self, route: str, caller: str | None) -> Callable[[bool], None]:
        def ended(disconnected: bool) -> None:
            self._leave(caller)
            self.core.metrics.in_flight.dec()
            if disconnected:
                self.metrics.disconnects.labels(route).inc()

        return ended

    async def _collect(self, stream: CoreStream) -> tuple[str, Finished]:
        parts: list[str] = []
        while (item := await stream.next()) is not None:
            if isinstance(item, Delta):
                parts.append(item.text)
            elif isinstance(item, Finished):
                return "".join(parts), item
        raise Unavailable("the generation ended without its summary; retry the request")

    async def _events(
        self, stream: CoreStream, first: object | None, shape: ResponseShape
    ) -> AsyncIterator[bytes]:
        """The SSE events of a stream whose first item was already taken."""
        if shape.chat:
            yield _sse(shape.chunk("", role=True))
        item = first
        try:
            while item is not None:
                if isinstance(item, Delta) and item.text:
                    yield _sse(shape.chunk(item.text))
                elif isinstance(item, Finished):
                    yield _sse(shape.last_chunk(item))
                    if shape.include_usage:
                        yield _sse(shape.usage_chunk(item))
                    break
                item = await stream.next()
            else:
                raise Unavailable("the generation ended without its summary; retry the request")
        except Exception as exc:
            # The status line is long gone: the error travels as an event, as OpenAI sends it.
            _, body = error_body(exc)
            yield b"data: " + body + b"\n\n"
        yield b"data: [DONE]\n\n"

    # --- helpers -------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        """The whole body, within `max_request_bytes` and `body_timeout_s`."""
        try:
            with anyio.fail_after(self.body_timeout_s or None):
                return await self._read_body(request)
        except TimeoutError:
            raise HttpError(
                REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.body_timeout_s:g} s "
                "(limit --request-timeout)",
            ) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise HttpError(BAD_REQUEST, f"Content-Length {declared!r} is not a number")
            if int(declared) > limit:
                raise HttpError(TOO_LARGE, _too_large(int(declared), limit))
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body has no Content-Length: count as it arrives
                raise HttpError(TOO_LARGE, _too_large(size, limit))
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise NotFound(
                f"model {model!r} does not exist here; this gateway serves {self.model!r} "
                "(GET /v1/models)"
            )


def _too_large(size: int, limit: int) -> str:
    return (
        f"request body of {size} bytes or more exceeds the gateway's limit of {limit} bytes "
        "(--max-request-bytes)"
    )


class _EventStream(Response):
    """A server-sent event stream that cancels its generation when the client goes away."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        stream: CoreStream,
        ended: Callable[[bool], None],
    ) -> None:
        self.events = events
        self.stream = stream
        self.ended = ended
        self.status_code = 200
        self.background = None
        self.init_headers(_SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    nonlocal disconnected
                    await wait_for_disconnect(receive)
                    disconnected = True
                    self.stream.cancelled.set()
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:  # ASGI 2.4 servers raise on a send to a closed connection
            disconnected = True
        finally:
            await self.stream.close()
            self.ended(disconnected)
