"""The in-process backend: a byte-bounded LRU, the embedded default.

Bytes count keys and values (not Python object overhead), so `max_bytes` bounds what callers put
in, not the process's RSS exactly. A value larger than the whole bound is not stored (a put
reports it as not stored) rather than evicting everything else for it. Expired keys are dropped
when they are next touched; until then they count towards the bound and are evicted like any
other key.

With `evict=False` (the session space, `services.store.backends.split`) nothing is ever evicted
for room: a put that does not fit, once expired keys are dropped, is refused with
RESOURCE_EXHAUSTED, and what is stored stays until it expires or is deleted.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpool.errors import ResourceExhausted
from services.store.backends.base import BackendStats


@dataclass(frozen=True, slots=True)
class _Entry:
    value: bytes
    expires_at: float | None  # monotonic seconds


class MemoryStore:
    """A `StorageBackend` in a dict, oldest-used first; thread-safe."""

    def __init__(
        self,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        evict: bool = True,
        full: str = "the memory backend is full",
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._max_bytes = max_bytes
        self._evict = evict
        self._full = full  # the refusal's words when nothing may be evicted
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
            self._remove(key)
            return None
        return entry

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(key) + len(entry.value)

    def lookup(self, keys: Sequence[str]) -> int:
        now = self._clock()
        with self._lock:
            # Like Redis EXISTS, a lookup does not refresh recency: only reads do.
            for n, key in enumerate(keys):
                if self._live(key, now) is None:
                    return n
            return len(keys)

    def sizes(self, keys: Sequence[str]) -> list[int]:
        now = self._clock()
        with self._lock:
            return [len(e.value) if (e := self._live(key, now)) else 0 for key in keys]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                entry = self._live(key, now)
                if entry is None:
                    out.append(None)
                else:
                    self._entries.move_to_end(key)
                    out.append(entry.value)
        return out

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        now = self._clock()
        expires_at = now + ttl_s if ttl_s else None
        stored = 0
        with self._lock:
            for key, buffer in items:
                value = bytes(buffer)  # a view would pin its whole gRPC message
                size = len(key) + len(value)
                if size > self._max_bytes:
                    continue
                if key in self._entries:
                    self._remove(key)
                if not self._evict and self._bytes + size > self._max_bytes:
                    self._drop_expired(now)
                    if self._bytes + size > self._max_bytes:
                        raise ResourceExhausted(
                            f"{self._full}: {self._bytes} of {self._max_bytes} bytes in use"
                        )
                self._entries[key] = _Entry(value, expires_at)
                self._bytes += size
                stored += 1
                while self._bytes > self._max_bytes:
                    oldest = next(iter(self._entries))
                    self._remove(oldest)
                    self._evictions += 1
        return stored

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires_at and e.expires_at <= now]:
            self._remove(key)

    def delete(self, keys: Sequence[str]) -> int:
        now = self._clock()
        deleted = 0
        with self._lock:
            for key in keys:
                if self._live(key, now) is not None:
                    self._remove(key)
                    deleted += 1
        return deleted

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                backend="memory",
                keys=len(self._entries),
                bytes=self._bytes,
                capacity_bytes=self._max_bytes,
                evictions=self._evictions,
            )

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
