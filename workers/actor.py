"""The Ray actor around `KVWorker`: one per GPU, or per CPU slot.

The actor is threaded (`max_concurrency`), so `info`, `stats` and `ping` answer while
generations run, and several generations can share the model. `generate` is a streaming
generator method: the caller iterates the returned `ObjectRefGenerator` and `ray.get`s each ref.
When the actor dies, that raises `ray.exceptions.RayActorError`, which is the gateway's cue to
fail over.
"""

import ctypes
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import ray

from kvpool.errors import KvpoolError
from workers.api import (
    ActorResources,
    PrefillResult,
    TokenEvent,
    WorkDone,
    WorkerConfig,
    WorkerInfo,
    WorkerStats,
    WorkRequest,
)

log = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "kvpool-worker-"


class WorkerActor:
    """Ray-facing methods; each forwards to the `KVWorker` built in the actor's process."""

    def __init__(self, config: WorkerConfig, worker_id: str) -> None:
        logging.basicConfig(level=os.environ.get("KVPOOL_LOG_LEVEL", "WARNING"))
        if config.retain_freed_memory:
            retain_freed_memory()
        self._startup_error: KvpoolError | None = None
        # Imported here, in the actor's process: the gateway imports this module to start actors
        # and must not load torch (workers.api).
        from workers.worker import KVWorker

        try:
            self._worker = KVWorker(config, worker_id)
        except KvpoolError as exc:
            # Kept for `info`, which the gateway calls first: raised from a method it reaches the
            # caller as itself (say, InvalidArgument naming the bad model), where a failing
            # constructor would surface as Ray's ActorDiedError wrapping a remote traceback.
            self._startup_error = exc

    def ping(self) -> str:
        return self.info().worker_id

    def info(self) -> WorkerInfo:
        if self._startup_error is not None:
            raise self._startup_error
        return self._worker.info()

    def tokenizer_files(self) -> dict[str, bytes]:
        return self._worker.tokenizer_files()

    def generate(self, request: WorkRequest) -> Iterator[TokenEvent | WorkDone]:
        yield from self._worker.generate(request)

    def cancel(self, request_id: str) -> None:
        self._worker.cancel(request_id)

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        return self._worker.prefill(token_ids, tenant)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._worker.flush(timeout_s)

    def stats(self) -> WorkerStats:
        return self._worker.stats()

    def close(self) -> None:
        self._worker.close()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory in this process instead of handing it back to the kernel.

    Why: a cache hit builds a few large tensors per request (about 100 MB per 1k SmolLM2 tokens:
    decoded blocks, the cache, its copy on the next token). By default glibc serves those with
    fresh mmaps, or from per-thread arenas that it shrinks, and returns them when they are freed. On
    VMs that reclaim freed guest pages, such as these development machines, every page of the next
    request then costs a host fault. With one arena, no mmap and no trimming, the pages stay mapped
    and are reused. Measured on 2048-token store hits through Ray: 0.8-1.3 s after a few requests
    without this, a steady 0.36-0.40 s with it. The cost is that the worker's RSS stays at its high
    water mark (the L1 bound plus one request's working set). Returns False where it does not
    apply (not Linux, not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value)
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    )


def start_actor(
    config: WorkerConfig, worker_id: str, resources: ActorResources
) -> "ray.actor.ActorHandle":
    """Create a worker actor (its model loads in the background; `ping` returns once ready)."""
    remote_cls = ray.remote(WorkerActor).options(
        name=ACTOR_NAME_PREFIX + worker_id,
        num_gpus=resources.num_gpus,
        num_cpus=resources.num_cpus,
        max_concurrency=resources.max_concurrency,
        # The gateway replaces dead workers itself (with a fresh id), so Ray must not restart
        # them behind its back: a restarted actor would have an empty L1 under an old route.
        max_restarts=0,
    )
    return remote_cls.remote(config, worker_id)
