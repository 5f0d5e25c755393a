"""Bytes in flight: the one bound on how much value data the store holds for calls at once.

Every Get window and every Put block reserves its bytes here before they are read from the
backend or buffered from the wire, and gives them back once sent or written. The server's memory
for calls is then about `capacity` times a small copy factor (docs/store.md, "Memory bound"),
whatever clients ask for: without it one Get of `[small, small, big x 256]` made Redis return
256 big values in one reply.

A caller that already holds bytes must not wait for more while holding them (two Gets each
holding a window and waiting for the next would wait for each other): it uses `try_acquire` and,
when that fails, gives back what it holds before it calls `acquire`.
"""

import threading
import time

from kvpool.errors import ResourceExhausted


class ByteBudget:
    """A counting semaphore on bytes; thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever held at once (for tests and metrics)."""
        with self._cond:
            return self._peak

    def _check(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot reserve {n} bytes")
        if n > self.capacity:
            raise ResourceExhausted(
                f"{n} bytes in one piece exceed the store's {self.capacity} bytes in flight "
                "(--max-inflight-bytes)"
            )

    def _take(self, n: int) -> None:
        self._used += n
        self._peak = max(self._peak, self._used)

    def try_acquire(self, n: int) -> bool:
        """Reserve `n` bytes now if they fit; never waits."""
        self._check(n)
        with self._cond:
            if self._used + n > self.capacity:
                return False
            self._take(n)
            return True

    def acquire(self, n: int, deadline: float) -> None:
        """Reserve `n` bytes, waiting until `deadline` (time.monotonic()) at the latest.

        Raises ResourceExhausted when they do not fit in time (the store is busy: retry later).
        """
        self._check(n)
        with self._cond:
            while self._used + n > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhausted(
                        f"the store is busy: {self._used} of {self.capacity} bytes in flight "
                        f"and {n} more did not fit before the call's deadline"
                    )
                self._cond.wait(left)
            self._take(n)

    def force(self, n: int) -> None:
        """Count `n` bytes that are already held (a value grew between its size and its read)."""
        with self._cond:
            self._take(max(0, n))

    def release(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self._used = max(0, self._used - n)
            self._cond.notify_all()
