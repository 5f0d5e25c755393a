"""The gateway's workers: Ray actors it starts, watches, and replaces when they die.

The pool is the one place the gateway calls Ray, and it owns the router: it builds it from its
config (`PoolConfig.routing`) and adds and removes each worker there as the worker starts and
dies. The core (`services.gateway.core`) picks a worker with `pool.router` (`acquire`, `record`,
`release`) and asks the pool to `stream` a request from it (raising `WorkerLost` when the worker
dies or stalls) or `prefill` on it, in domain types. The pool also holds the workers' tokenizer
(`prompts`), fetched once from the first worker, so prompts are tokenized here and never sent to
a worker and back.

Every worker must serve the same model with the same codec and block size (the same block
namespace), or blocks computed by one would be useless to another; `start` checks that. A dead
worker leaves the router at once and is killed (a worker Ray calls unavailable may still be
running and holding its GPU), and a replacement, with a fresh id, is started in the background;
it joins the router when its model has loaded. A replacement that fails to start is killed and
tried again with backoff, `replace_attempts` times.

A stream has three clocks (docs/gateway.md, "Timeouts"): until the worker's `WorkStarted` marker
and between two tokens, `token_timeout_s` (past it the worker is dead); from the marker to the
first token, `prefill_timeout_s` (past it the request fails with `PrefillTimeout`, and the worker
is left alone). Time in the router's queue counts toward none of them.
"""

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from kvpool.errors import KvpoolError, Unavailable
from services.gateway.router import Router
from services.gateway.settings import PoolConfig
from workers.actor import start_actor
from workers.api import (
    PrefillResult,
    PrefillTimeout,
    TokenEvent,
    WorkDone,
    WorkerInfo,
    WorkerStats,
    WorkRequest,
    WorkStarted,
)
from workers.node_tier import start_node_tiers, stop_node_tiers
from workers.prompt import PromptEncoder

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ray raises these when the actor process is gone or unreachable; anything else from a worker
# is the request's own outcome.
WORKER_GONE: tuple[type[BaseException], ...] = (RayActorError,)
try:  # Ray >= 2.33: the actor's node is unreachable but may come back
    from ray.exceptions import ActorUnavailableError

    WORKER_GONE = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover - older Ray
    pass


_ENDED = object()  # a worker's stream has no more items


class WorkerLost(Exception):
    """The worker serving a request died or stalled; the request moves to another one."""


# How often a stream that waits for its worker looks at its client's cancellation.
_POLL_S = 0.5


def unwrap(exc: RayTaskError) -> BaseException:
    """The worker's own exception inside a RayTaskError, when it is one of ours."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, KvpoolError) else exc


def call(ref: Any, timeout_s: float | None = None) -> Any:
    """`ray.get` that re-raises a worker's kvpool error as itself (InvalidArgument stays one)."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as exc:
        raise unwrap(exc) from None


class WorkerPool:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.router = Router(config.routing)  # the live workers: added and removed below
        self._actors: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._info: WorkerInfo | None = None
        self._prompts: PromptEncoder | None = None
        self._node_tiers: dict[str, Any] = {}
        self.deaths = 0
        self.replacements = 0
        self.replace_failures = 0  # replacements given up on after every attempt failed
        self.on_change: Callable[[], None] = lambda: None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> WorkerInfo:
        """Start the node tiers, then the workers, and wait until each has loaded its model."""
        self._start_node_tiers()
        started = {self._new_id(): None for _ in range(self.config.workers)}
        handles = {
            wid: start_actor(self.config.worker, wid, self.config.actor_resources)
            for wid in started
        }
        infos = []
        for wid, handle in handles.items():
            try:
                infos.append(call(handle.info.remote(), self.config.start_timeout_s))
            except (GetTimeoutError, KvpoolError, *WORKER_GONE) as exc:
                for other in handles.values():
                    ray.kill(other, no_restart=True)
                if isinstance(exc, KvpoolError):
                    raise  # the worker's own reason, e.g. an unknown model
                raise Unavailable(f"worker {wid} did not start: {exc}") from exc
        first = infos[0]
        for info in infos[1:]:
            if _namespace_of(info) != _namespace_of(first):
                raise Unavailable(
                    f"workers disagree on the block namespace: {_namespace_of(first)} vs "
                    f"{_namespace_of(info)}; every worker must load the same model and codec"
                )
        try:
            files = call(next(iter(handles.values())).tokenizer_files.remote(), 60)
        except (GetTimeoutError, *WORKER_GONE) as exc:
            for other in handles.values():
                ray.kill(other, no_restart=True)
            raise Unavailable(f"could not read the workers' tokenizer: {exc}") from exc
        self._prompts = PromptEncoder.from_files(
            files, name=first.model, vocab_size=first.vocab_size, eos_token_ids=first.eos_token_ids
        )
        self._info = first
        with self._lock:
            self._actors.update(handles)
        for wid in handles:
            self.router.add_worker(wid)
        self.on_change()
        return first

    def close(self) -> None:
        """Flush each worker's write-behind queue, then stop the actors."""
        self._closed.set()
        with self._lock:
            actors = dict(self._actors)
            self._actors.clear()
        flushes = []
        for handle in actors.values():
            with contextlib.suppress(Exception):  # a dead worker has nothing to flush
                flushes.append(handle.close.remote())
        try:
            ray.get(flushes, timeout=30)
        except Exception as exc:
            log.warning("some workers did not flush before shutdown: %s", exc)
        for wid, handle in actors.items():
            self.router.remove_worker(wid)
            ray.kill(handle, no_restart=True)
        stop_node_tiers(self._node_tiers)
        self._node_tiers = {}

    def _start_node_tiers(self) -> None:
        """One node tier per node, owned by this process so that it outlives every worker.

        Called again before each replacement, so a node that joined since gets one too.
        """
        if self.config.node_tier_bytes and self.config.worker.reads_node_tier:
            try:
                # Only new nodes: replacing a handle we own with one got by name would drop the
                # tier's last owning handle, and Ray would end it with every block it held.
                fresh = start_node_tiers(self.config.node_tier_bytes, skip=set(self._node_tiers))
                self._node_tiers.update(fresh)
            except Exception as exc:  # workers then run without L2, as on a node without one
                log.warning("could not start the node tiers: %s", exc)

    # --- lookups ---------------------------------------------------------------------------

    @property
    def info(self) -> WorkerInfo:
        if self._info is None:
            raise Unavailable("the worker pool has not started")
        return self._info

    def handle(self, worker_id: str) -> Any:
        with self._lock:
            handle = self._actors.get(worker_id)
        if handle is None:
            raise Unavailable(f"worker {worker_id} is gone")
        return handle

    def live(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._actors)

    @property
    def prompts(self) -> PromptEncoder:
        """The workers' tokenizer, loaded in this process (no torch)."""
        if self._prompts is None:
            raise Unavailable("the worker pool has not started")
        return self._prompts

    def has_live(self, excluded: set[str] | frozenset[str] = frozenset()) -> bool:
        return bool(set(self.live()) - set(excluded))

    # --- requests --------------------------------------------------------------------------

    def stream(
        self,
        worker_id: str,
        request: WorkRequest,
        cancelled: threading.Event | None,
        token_timeout_s: float,
        prefill_timeout_s: float | None = None,
    ) -> Iterator[TokenEvent | WorkDone]:
        """The worker's tokens, ending with its WorkDone.

        Raises WorkerLost when the worker dies, or stays silent for `token_timeout_s` before it
        starts the request or between two tokens (then it is killed and replaced); PrefillTimeout
        when its first token takes longer than `prefill_timeout_s` after it started. A stream
        left early (the client went away, `cancelled`, a timeout, or the caller stopped
        iterating) is cancelled on the worker.
        """
        try:
            handle = self.handle(worker_id)
        except Unavailable as exc:
            raise WorkerLost(str(exc)) from None
        refs = handle.generate.options(num_returns="streaming").remote(request)
        started = tokens = False
        finished = False
        try:
            while True:
                first_due = prefill_timeout_s if started and not tokens else None
                item = self._next(
                    worker_id, request, refs, cancelled, started, token_timeout_s, first_due
                )
                if item is None:
                    return  # cancelled
                if item is _ENDED:
                    finished = True
                    return
                if isinstance(item, WorkStarted):
                    started = True
                    continue
                tokens = True
                yield item
                if isinstance(item, WorkDone):
                    finished = True
        finally:
            if not finished:
                # The client left (or we failed over): stop the worker spending its time on it.
                with contextlib.suppress(Exception):  # a dead worker is not generating anyway
                    handle.cancel.remote(request.request_id)

    def _next(
        self,
        worker_id: str,
        request: WorkRequest,
        refs: Any,
        cancelled: threading.Event | None,
        started: bool,
        token_timeout_s: float,
        prefill_timeout_s: float | None,
    ) -> Any:
        """The stream's next item, `_ENDED` after its last, None once `cancelled`; raises as
        `stream` says. `prefill_timeout_s` is the wait while the first token is due."""
        try:
            wait_s = token_timeout_s if prefill_timeout_s is None else prefill_timeout_s
            if not self._wait(refs, wait_s, cancelled):
                return None
            return ray.get(next(refs), timeout=token_timeout_s)
        except StopIteration:
            return _ENDED
        except WORKER_GONE as exc:
            self.mark_dead(worker_id)
            raise WorkerLost(type(exc).__name__) from None
        except GetTimeoutError:
            if prefill_timeout_s is not None:
                raise PrefillTimeout(
                    f"no first token after {prefill_timeout_s:g} s of prefill of "
                    f"{len(request.token_ids) + len(request.prior_output)} tokens (limit "
                    f"--prefill-timeout={prefill_timeout_s:g}); send a shorter prompt"
                ) from None
            self.mark_dead(worker_id)
            what = "between two tokens" if started else "before starting the request"
            raise WorkerLost(f"silent for {token_timeout_s:g} s {what}") from None
        except RayTaskError as exc:
            raise unwrap(exc) from None

    @staticmethod
    def _wait(refs: Any, timeout_s: float, cancelled: threading.Event | None) -> bool:
        """Wait for the stream's next item: True when it is ready, False when the client left.

        Raises GetTimeoutError after `timeout_s`. Waits in short slices, so a client that goes
        away frees its worker at once, not at the next token.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if cancelled is not None and cancelled.is_set():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise GetTimeoutError("no item")
            ready, _ = ray.wait([refs], timeout=min(left, _POLL_S))
            if ready:
                return True

    def prefill(
        self,
        worker_id: str,
        token_ids: Sequence[int],
        tenant: str,
        timeout_s: float | None = None,
    ) -> PrefillResult:
        """Store the full blocks of `token_ids` on `worker_id`.

        WorkerLost when it is gone; PrefillTimeout past `timeout_s` (the worker is left alone).
        """
        try:
            return call(self.handle(worker_id).prefill.remote(list(token_ids), tenant), timeout_s)
        except WORKER_GONE as exc:
            self.mark_dead(worker_id)
            raise WorkerLost(type(exc).__name__) from None
        except GetTimeoutError:
            raise PrefillTimeout(
                f"prefill of {len(token_ids)} tokens took longer than --prefill-timeout="
                f"{timeout_s:g} s; send a shorter prompt"
            ) from None

    def stats(self, timeout_s: float = 2.0) -> list[WorkerStats]:
        """Each live worker's stats; workers that do not answer in time are left out."""
        stats = []
        for handle in self.live().values():
            try:
                stats.append(call(handle.stats.remote(), timeout_s))
            except Exception:  # a dead or busy worker is absent from this scrape
                continue
        return stats

    def flush(self, timeout_s: float = 120.0) -> None:
        """Wait until every live worker has written the blocks it cut so far (tests, benches)."""
        for handle in self.live().values():
            call(handle.flush.remote(), timeout_s)

    # --- failures --------------------------------------------------------------------------

    def mark_dead(self, worker_id: str) -> None:
        """Forget a worker that died or hung, kill it, and start a replacement in the background.

        Killed whatever Ray said: an actor reported unavailable (its node unreachable for a
        while) may still be running, holding its GPU, which the replacement then waits for.
        """
        with self._lock:
            handle = self._actors.pop(worker_id, None)
        if handle is None:
            return  # another request saw it first
        self.deaths += 1
        self.router.remove_worker(worker_id)
        log.warning("worker %s is gone; %s", worker_id, "replacing it" if self._replacing else "")
        with contextlib.suppress(Exception):  # it may have died on its own meanwhile
            ray.kill(handle, no_restart=True)
        self.on_change()
        if self._replacing:
            threading.Thread(
                target=self._replace, name="kvpool-replace-worker", daemon=True
            ).start()

    @property
    def _replacing(self) -> bool:
        return self.config.replace_dead and not self._closed.is_set()

    def _replace(self) -> None:
        """Start a replacement, retrying with backoff; gives up after `replace_attempts`."""
        backoff = self.config.replace_backoff_s
        for attempt in range(1, self.config.replace_attempts + 1):
            if self._closed.is_set():
                return
            if self._start_replacement():
                return
            if attempt < self.config.replace_attempts:
                log.warning("replacement attempt %d failed; retrying in %.1f s", attempt, backoff)
                if self._closed.wait(backoff):
                    return  # shutting down
                backoff = min(backoff * 2, 60.0)
        self.replace_failures += 1
        log.error(
            "gave up replacing a worker after %d attempts; the pool runs one worker short",
            self.config.replace_attempts,
        )

    def _start_replacement(self) -> bool:
        """One attempt: True once the new worker serves (or when none is wanted any more)."""
        wid = self._new_id()
        self._start_node_tiers()
        handle = None
        try:
            handle = start_actor(self.config.worker, wid, self.config.actor_resources)
            info = call(handle.info.remote(), self.config.start_timeout_s)
        except Exception as exc:
            if handle is not None:  # still pending or loading: it would hold its GPU for good
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
            if self._closed.is_set():
                return True  # shutting down: the replacement was cancelled, as it should be
            log.error("could not start a replacement worker: %s", exc)
            return False
        if _namespace_of(info) != _namespace_of(self.info) or self._closed.is_set():
            ray.kill(handle, no_restart=True)
            return True  # a different model is not fixed by trying again
        with self._lock:
            self._actors[wid] = handle
        self.replacements += 1
        self.router.add_worker(wid)
        self.on_change()
        log.warning("replacement worker %s is serving", wid)
        return True

    @staticmethod
    def _new_id() -> str:
        return uuid.uuid4().hex[:8]


def _namespace_of(info: WorkerInfo) -> tuple[str, str, int]:
    return (info.fingerprint, info.codec, info.block_tokens)
