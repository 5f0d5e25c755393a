"""A circuit breaker: after repeated failures, fail fast for a while instead of waiting again.

A hung Redis (or a hung store) does not refuse connections: every call waits for its whole
timeout. Without a breaker each caller pays that wait, holding a thread, on every call. With one,
`threshold` consecutive failures open the circuit; for `cooldown_s` calls are refused at once
(callers treat that as a miss); then one call is let through as a probe. Its success closes the
circuit, its failure opens it again.

    breaker = Breaker("Redis at redis://10.0.0.5:6379/0")
    breaker.check()          # raises Unavailable while open
    try:
        value = do_call()
    except Unavailable:
        breaker.failure()
        raise
    breaker.success()
"""

import threading
import time
from collections.abc import Callable

from kvpool.errors import Unavailable


class Breaker:
    """Closed -> (threshold failures) open -> (cooldown) a probe -> closed or open; thread-safe."""

    def __init__(
        self,
        name: str,
        *,
        threshold: int = 3,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown_s <= 0:
            raise ValueError("threshold must be >= 1 and cooldown_s positive")
        self.name = name
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        # Told True when the circuit opens and False when it closes (metrics; outside the lock).
        self.on_change: Callable[[bool], None] = lambda is_open: None

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failures >= self._threshold

    def check(self) -> None:
        """Raise Unavailable at once while the circuit is open (one probe passes per cooldown)."""
        with self._lock:
            if self._failures < self._threshold:
                return
            now = self._clock()
            if now >= self._open_until:
                # This caller is the probe; the others fail fast for another cooldown (so a
                # probe that never reports back cannot keep the circuit open for good).
                self._open_until = now + self._cooldown_s
                return
            retry_after_s = self._open_until - now
        raise Unavailable(
            f"{self.name} failed {self._threshold} times in a row; "
            f"not waiting on it for {self._cooldown_s:g} s (circuit open)",
            retry_after_s=retry_after_s,
        )

    def success(self) -> None:
        with self._lock:
            was_open = self._failures >= self._threshold
            self._failures = 0
        if was_open:
            self.on_change(False)

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            opened = self._failures == self._threshold
            if self._failures >= self._threshold:
                self._open_until = self._clock() + self._cooldown_s
        if opened:
            self.on_change(True)
