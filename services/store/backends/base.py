"""The storage-tier contract every KVStore backend implements."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BackendStats:
    """What a backend knows about itself; None where it cannot tell."""

    backend: str  # "memory" or the Redis URL without its password
    keys: int | None = None
    bytes: int | None = None
    capacity_bytes: int | None = None
    evictions: int | None = None
    dropped: int | None = None  # keys a failing shard could not serve (Redis Cluster)


class StorageBackend(Protocol):
    """Opaque values under opaque keys. Keys reach a backend already validated.

    Backends raise `kvpool.errors.Unavailable` when their storage cannot be reached and
    `ResourceExhausted` when it is full and cannot evict; a missing key is a value (None, or a
    shorter prefix), never an exception.
    """

    def lookup(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the start, are present (one round trip for the chain)."""
        ...

    def sizes(self, keys: Sequence[str]) -> list[int]:
        """The byte length of each key's value, in order; 0 for a missing key (one round trip).

        The store reserves a Get window's bytes from these before it reads the window.
        """
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, in order; None for a missing key."""
        ...

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        """Write each value atomically (with a TTL when given); returns how many were stored.

        A value may be a view into a received message: a backend that keeps it copies it.
        """
        ...

    def delete(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many existed."""
        ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None: ...
