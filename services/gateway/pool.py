"""The gateway's workers: Ray actors it starts, watches, and replaces when they die.

Every worker must serve the same model with the same codec and block size (the same block
namespace), or blocks computed by one would be useless to another; `start` checks that. A dead
worker leaves the router at once and a replacement, with a fresh id, is started in the
background; it joins the router when its model has loaded.
"""

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from kvpool.errors import KvpoolError, Unavailable
from services.gateway.router import Router
from workers.actor import ActorResources, start_actor
from workers.node_tier import DEFAULT_NODE_TIER_BYTES, start_node_tiers, stop_node_tiers
from workers.worker import WorkerConfig, WorkerInfo

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


@dataclass(frozen=True, slots=True)
class PoolConfig:
    workers: int = 1
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    resources: ActorResources = field(default_factory=ActorResources)
    start_timeout_s: float = 600.0  # model load in a fresh process, conversion included
    replace_dead: bool = True
    # Bytes of each node's tier (L2, workers.node_tier), shared by the node's workers; 0: none.
    node_tier_bytes: int = DEFAULT_NODE_TIER_BYTES

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.node_tier_bytes < 0:
            raise ValueError(f"node_tier_bytes must be >= 0 (0: no node tier), got "
                             f"{self.node_tier_bytes}")  # fmt: skip


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
    def __init__(self, config: PoolConfig, router: Router) -> None:
        self.config = config
        self.router = router
        self._actors: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._info: WorkerInfo | None = None
        self._node_tiers: dict[str, Any] = {}
        self.deaths = 0
        self.replacements = 0
        self.on_change: Callable[[], None] = lambda: None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> WorkerInfo:
        """Start the node tiers, then the workers, and wait until each has loaded its model."""
        self._start_node_tiers()
        started = {self._new_id(): None for _ in range(self.config.workers)}
        handles = {
            wid: start_actor(self.config.worker, wid, self.config.resources) for wid in started
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
        if self.config.node_tier_bytes and self.config.worker.node_tier:
            try:
                self._node_tiers.update(start_node_tiers(self.config.node_tier_bytes))
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

    def least_loaded(self) -> tuple[str, Any]:
        """A worker for small calls (tokenizing), without counting it as a request."""
        live = self.live()
        if not live:
            raise Unavailable("no live worker")
        wid = min(live, key=self.router.in_flight)
        return wid, live[wid]

    def on_any(self, fn: Callable[[Any], Any], timeout_s: float = 60.0) -> Any:
        """Run a small call on a live worker, trying the next one when a worker is gone."""
        tried: set[str] = set()
        while True:
            live = {w: h for w, h in self.live().items() if w not in tried}
            if not live:
                raise Unavailable("no live worker answered")
            wid = min(live, key=self.router.in_flight)
            try:
                return call(fn(live[wid]), timeout_s)
            except WORKER_GONE:
                self.mark_dead(wid)
                tried.add(wid)

    # --- failures --------------------------------------------------------------------------

    def mark_dead(self, worker_id: str, kill: bool = False) -> None:
        """Forget a worker that died or hung, and start a replacement in the background."""
        with self._lock:
            handle = self._actors.pop(worker_id, None)
        if handle is None:
            return  # another request saw it first
        self.deaths += 1
        self.router.remove_worker(worker_id)
        log.warning("worker %s is gone; %s", worker_id, "replacing it" if self._replacing else "")
        if kill:
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
        wid = self._new_id()
        self._start_node_tiers()
        try:
            handle = start_actor(self.config.worker, wid, self.config.resources)
            info = call(handle.info.remote(), self.config.start_timeout_s)
        except Exception as exc:
            if self._closed.is_set():
                return  # shutting down: the replacement was cancelled, as it should be
            log.error("could not start a replacement worker: %s", exc)
            return
        if _namespace_of(info) != _namespace_of(self.info) or self._closed.is_set():
            ray.kill(handle, no_restart=True)
            return
        with self._lock:
            self._actors[wid] = handle
        self.replacements += 1
        self.router.add_worker(wid)
        self.on_change()
        log.warning("replacement worker %s is serving", wid)

    @staticmethod
    def _new_id() -> str:
        return uuid.uuid4().hex[:8]


def _namespace_of(info: WorkerInfo) -> tuple[str, str, int]:
    return (info.fingerprint, info.codec, info.block_tokens)
