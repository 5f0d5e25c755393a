"""kvpool's exception tree.

Every layer raises one of these (or a subclass) for an outcome the caller must hear about. The
gRPC layer maps them to status codes in exactly one place (`services/status.py`); the CLI prints
their message without a traceback. Expected outcomes (a cache miss, a shorter prefix) are values,
never exceptions.

This module imports nothing, so the pure core (`workers/kv`) may depend on it.
"""


class KvpoolError(Exception):
    """Base of every error kvpool raises on purpose."""


class InvalidArgument(KvpoolError, ValueError):
    """The caller sent something malformed; the message names what is allowed."""


class NotFound(KvpoolError, LookupError):
    """A named thing (a session, a model) does not exist."""


class ResourceExhausted(KvpoolError):
    """A configured limit was hit; the message names the limit."""


class Unavailable(KvpoolError):
    """A dependency (Redis, the store, a worker) cannot be reached right now; retrying may help.

    `retry_after_s`, when set, says how long a retry is pointless (an open circuit breaker):
    servers send it as gRPC's `grpc-retry-pushback-ms`, and clients do not retry sooner.
    """

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DataLoss(KvpoolError):
    """Stored data failed verification (checksum, version, shape). Readers treat it as a miss."""


class Unauthenticated(KvpoolError):
    """A bearer token is missing or wrong."""


class PermissionDenied(KvpoolError):
    """A dependency refused an operation for lack of a permission (a Redis ACL): retrying cannot
    help; the configuration must change."""
