"""The one map from kvpool's exception tree to HTTP statuses and OpenAI's error body.

It mirrors `services/status.py` (the gRPC map): a servicer-side exception class picks the
status, its message goes to the caller as it is, and anything else is a bug, logged with its
traceback and answered 500 with no internals. The body is OpenAI's:

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}

so the `openai` SDKs raise their matching exception (`BadRequestError` for 400,
`AuthenticationError` for 401, `NotFoundError` for 404, `RateLimitError` for 429, ...).
"""

import json
import logging
from dataclasses import dataclass

from kvpool import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str  # OpenAI's error `type`
    code: str | None = None  # OpenAI's error `code`, where it has one for the case


BAD_REQUEST = ErrorKind(400, "invalid_request_error")
UNAUTHENTICATED = ErrorKind(401, "authentication_error", "invalid_api_key")
NOT_FOUND = ErrorKind(404, "not_found_error")
REQUEST_TIMEOUT = ErrorKind(408, "invalid_request_error", "request_timeout")
TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large")
RATE_LIMITED = ErrorKind(429, "rate_limit_error", "rate_limit_exceeded")
DATA_LOSS = ErrorKind(500, "server_error", "data_loss")
INTERNAL = ErrorKind(500, "server_error")
UNAVAILABLE = ErrorKind(503, "service_unavailable_error")

# Order matters, as in services/status.py: InvalidArgument is also a ValueError.
_KINDS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (errors.InvalidArgument, BAD_REQUEST),
    (errors.NotFound, NOT_FOUND),
    (errors.ResourceExhausted, RATE_LIMITED),
    (errors.Unavailable, UNAVAILABLE),
    (errors.DataLoss, DATA_LOSS),
    (errors.Unauthenticated, UNAUTHENTICATED),
    (ValueError, BAD_REQUEST),
)


class HttpError(Exception):
    """An outcome the HTTP layer itself decides (a body too large, an unknown model or route)."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.param = param


def kind_for(exc: BaseException) -> ErrorKind:
    """The status and OpenAI type for an exception; 500 (logged) for anything unexpected."""
    if isinstance(exc, HttpError):
        return exc.kind
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return kind
    log.error("unexpected error in an HTTP handler", exc_info=exc)
    return INTERNAL


def error_body(exc: BaseException) -> tuple[int, bytes]:
    """(HTTP status, JSON body) in OpenAI's error shape."""
    kind = kind_for(exc)
    message = "internal error (details are in the server log)" if kind is INTERNAL else str(exc)
    param = exc.param if isinstance(exc, HttpError) else None
    body = {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}
    return kind.status, json.dumps(body).encode()
