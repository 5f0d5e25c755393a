"""From the event loop to the core's blocking stream, and from a client's disconnect to the core.

`InferenceCore.generate` is a blocking iterator: each step waits on a Ray worker. Each step runs
in a thread (bounded by a limiter shared by every stream), never on the event loop. When the
client goes away, the core's `cancelled` event is set: the core stops waiting for the worker at
its next token and tells the worker to cancel, as the gRPC servicer's `context.add_callback` does.

Closing a stream (the response is done, or the client left) always closes the core's iterator,
so its `finally` blocks run (the route released, the worker told to stop, an unsaved session's
slot freed). A step still running in its thread is never abandoned: the close waits for it, which
takes at most one token, because the core checks `cancelled` between tokens.
"""

import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import anyio
from anyio import CapacityLimiter
from starlette.types import Receive

T = TypeVar("T")
_END = object()


class CoreStream:
    """One core iterator, stepped in threads; `cancelled` is the event the core watches."""

    def __init__(
        self, items: Iterator[object], cancelled: threading.Event, limiter: CapacityLimiter
    ) -> None:
        self._items = items
        self.cancelled = cancelled
        self._limiter = limiter
        self._lock = threading.Lock()  # one step (or the close) at a time

    def _step(self) -> object:
        with self._lock:
            try:
                return next(self._items)
            except StopIteration:
                return _END

    def _close(self) -> None:
        with self._lock:  # waits for a step still in its thread: one token at most
            close = getattr(self._items, "close", None)  # a generator's: runs its finally blocks
            if close is not None:
                close()

    async def next(self) -> object | None:
        """The core's next item; None when the stream has ended."""
        item = await anyio.to_thread.run_sync(self._step, limiter=self._limiter)
        return None if item is _END else item

    async def close(self) -> None:
        """Cancel what is left and release it; safe to call more than once, even when cancelled."""
        self.cancelled.set()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (call only after the request body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(
    receive: Receive, work: Callable[[], Awaitable[T]], cancelled: threading.Event
) -> tuple[bool, T | None]:
    """(True, result of `work`), or (False, None) once the client disconnected first.

    On a disconnect `cancelled` is set and `work` is cancelled.
    """
    outcome: list[tuple[T | None, Exception | None]] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await wait_for_disconnect(receive)
            cancelled.set()
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            outcome.append((await work(), None))
        except Exception as exc:  # raised below, outside the task group (no exception group)
            outcome.append((None, exc))
        group.cancel_scope.cancel()
    if not outcome:
        return False, None
    value, error = outcome[0]
    if error is not None:
        raise error
    return True, value
