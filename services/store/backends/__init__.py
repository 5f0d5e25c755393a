"""Storage tiers behind the KVStore service, chosen by a backend spec: `memory` or a Redis URL.

`redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`) is a Redis Cluster.
"""

from urllib.parse import urlsplit

from kvpool.errors import InvalidArgument
from services.store.backends.base import BackendStats, StorageBackend
from services.store.backends.urls import CLUSTER_SCHEMES, redact_url

__all__ = [
    "CLUSTER_SCHEMES",
    "SCHEMES",
    "BackendStats",
    "StorageBackend",
    "check_backend_spec",
    "open_backend",
    "redact_url",
]

SCHEMES = ("memory", "redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def check_backend_spec(spec: str) -> None:
    """Raise InvalidArgument, listing what is allowed, unless `spec` names a known backend.

    Cheap and import-free, so the CLI rejects a bad spec before it loads grpc or redis.
    """
    if spec == "memory":
        return
    scheme = urlsplit(spec).scheme
    if f"{scheme}://" not in SCHEMES or not spec.startswith(f"{scheme}://"):
        raise InvalidArgument(
            f"unknown backend {redact_url(spec)!r}: use 'memory' or a URL starting with "
            + ", ".join(s for s in SCHEMES if s != "memory")
        )


def open_backend(
    spec: str,
    *,
    max_memory_bytes: int,
    redis_password: str | None = None,
    sessions: str | None = None,
    session_memory_bytes: int = 64 << 20,
) -> StorageBackend:
    """The backend for `spec`; `max_memory_bytes` bounds the memory backend only.

    Session records (backends/split.py) go to `sessions`: "memory" (a space of
    `session_memory_bytes` that never evicts) or a Redis URL. None: that space with the memory
    backend, the same Redis otherwise.
    """
    blocks = _open(spec, max_memory_bytes, redis_password)
    if sessions is None and spec != "memory":
        return blocks
    from services.store.backends.split import SplitBackend

    if sessions is None or sessions == "memory":
        from services.store.backends.memory import MemoryStore

        space = MemoryStore(
            session_memory_bytes,
            evict=False,
            full="the session space is full (limit --session-memory-bytes)",
        )
        return SplitBackend(blocks, space)
    return SplitBackend(blocks, _open(sessions, max_memory_bytes, redis_password))


def _open(spec: str, max_memory_bytes: int, redis_password: str | None) -> StorageBackend:
    check_backend_spec(spec)
    if spec == "memory":
        from services.store.backends.memory import MemoryStore

        return MemoryStore(max_memory_bytes)
    if spec.startswith(CLUSTER_SCHEMES):
        from services.store.backends.redis_cluster import RedisClusterStore

        return RedisClusterStore(spec, password=redis_password)
    from services.store.backends.redis import RedisStore

    return RedisStore(spec, password=redis_password)
