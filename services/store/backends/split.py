"""Two backends behind one: session records in a space of their own, blocks in the other.

Blocks are a cache: under memory pressure the backend evicts the least recently used, and a
miss only costs a recompute. A session is a conversation's history: evicted with the blocks, its
next turn found nothing and began anew, answered 200 with the history gone. So keys of the
session class (`keys.SESSION_KEY_PREFIX`) go to `sessions`, where no block is written and so no
block can push them out: by default an in-process space that never evicts (the memory
backend), or a Redis of their own (`--session-backend`, run with `noeviction`). Every other key
goes to `blocks`. A call with keys of both classes is split and answered in the callers' order.
"""

from collections.abc import Sequence

from services.store.backends.base import BackendStats, StorageBackend
from services.store.keys import SESSION_KEY_PREFIX


def _is_session(key: str) -> bool:
    return key.startswith(SESSION_KEY_PREFIX)


class SplitBackend:
    """A `StorageBackend` that keeps the session key class apart from blocks."""

    def __init__(self, blocks: StorageBackend, sessions: StorageBackend) -> None:
        self.blocks = blocks
        self.sessions = sessions

    def _of(self, key: str) -> StorageBackend:
        return self.sessions if _is_session(key) else self.blocks

    def lookup(self, keys: Sequence[str]) -> int:
        present = 0
        start = 0
        while start < len(keys):  # runs of one class, in order, until the first miss
            backend = self._of(keys[start])
            stop = start
            while stop < len(keys) and self._of(keys[stop]) is backend:
                stop += 1
            found = backend.lookup(keys[start:stop])
            present += found
            if found < stop - start:
                break
            start = stop
        return present

    def sizes(self, keys: Sequence[str]) -> list[int]:
        return self._merge(keys, lambda backend, some: backend.sizes(some), 0)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._merge(keys, lambda backend, some: backend.get_many(some), None)

    def _merge(self, keys, call, missing):  # type: ignore[no-untyped-def]
        if not any(_is_session(k) for k in keys):
            return call(self.blocks, keys)  # the hot path: a chain of blocks
        out = [missing] * len(keys)
        for backend in (self.blocks, self.sessions):
            at = [n for n, k in enumerate(keys) if self._of(k) is backend]
            if at:
                for n, value in zip(at, call(backend, [keys[n] for n in at]), strict=True):
                    out[n] = value
        return out

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]], ttl_s: int | None) -> int:
        sessions = [item for item in items if _is_session(item[0])]
        if not sessions:
            return self.blocks.put_many(items, ttl_s)
        blocks = [item for item in items if not _is_session(item[0])]
        stored = self.sessions.put_many(sessions, ttl_s)
        return stored + (self.blocks.put_many(blocks, ttl_s) if blocks else 0)

    def delete(self, keys: Sequence[str]) -> int:
        sessions = [k for k in keys if _is_session(k)]
        blocks = [k for k in keys if not _is_session(k)]
        return (self.sessions.delete(sessions) if sessions else 0) + (
            self.blocks.delete(blocks) if blocks else 0
        )

    def stats(self) -> BackendStats:
        """The blocks' backend's figures (what the store's metrics describe), sessions added to
        its key and byte counts when they live elsewhere."""
        main = self.blocks.stats()
        try:
            extra = self.sessions.stats()
        except Exception:  # the session space is down: the blocks' figures still stand
            return main

        def plus(a: int | None, b: int | None) -> int | None:
            return None if a is None else a + (b or 0)

        return BackendStats(
            backend=main.backend,
            keys=plus(main.keys, extra.keys),
            bytes=plus(main.bytes, extra.bytes),
            capacity_bytes=main.capacity_bytes,
            evictions=main.evictions,
            dropped=main.dropped,
        )

    def close(self) -> None:
        try:
            self.blocks.close()
        finally:
            self.sessions.close()
