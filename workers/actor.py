"""The Ray actor around a worker: one per GPU, or per CPU slot.

The worker is `KVWorker` (kvpool's transformers engine) or `VLLMWorker` (a vLLM engine in a
child process), by `WorkerConfig.engine`: `build_worker` is the one place that chooses, and
both answer the calls of `Worker`, so nothing above the actor knows which engine runs.

The actor is threaded: generations share the model on `max_concurrency` threads, and the control
calls (`info`, `stats`, `ping`, `cancel`, `flush`, `close`) run in a concurrency group of their
own, so a worker full of generations still answers them at once instead of queueing them behind
the streams (which made a busy worker look dead). `generate` is a streaming generator method: the
caller iterates the returned `ObjectRefGenerator` and `ray.get`s each ref. Its first item is a
`WorkStarted` marker, sent when a thread takes the request up, so the caller can tell time spent
in Ray's queue from time spent on the request. When the actor dies, reading raises
`ray.exceptions.RayActorError`, which is the gateway's cue to fail over.
"""

import ctypes
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Protocol

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
    WorkStarted,
)

log = logging.getLogger(__name__)

ACTOR_NAME_PREFIX = "kvpool-worker-"
# Threads of the control group: enough for a stats scrape, a cancel and a health check at once.
CONTROL_GROUP = "control"
CONTROL_THREADS = 4


class Worker(Protocol):
    """What the actor calls on its worker, whichever engine runs it."""

    worker_id: str

    def info(self) -> WorkerInfo: ...
    def tokenizer_files(self) -> dict[str, bytes]: ...
    def generate(self, request: WorkRequest) -> Iterator[TokenEvent | WorkDone]: ...
    def cancel(self, request_id: str) -> None: ...
    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult: ...
    def flush(self, timeout_s: float = 30.0) -> bool: ...
    def stats(self) -> WorkerStats: ...
    def close(self) -> None: ...


def build_worker(config: WorkerConfig, worker_id: str) -> Worker:
    """The worker of `config.engine`, imported here, in the actor's process: the gateway imports
    this module to start actors and must not load torch (workers.api)."""
    if config.engine == "vllm":
        from workers.vllm_worker import VLLMWorker  # torch-free; vLLM runs in a child process

        return VLLMWorker(config, worker_id)
    from workers.worker import KVWorker

    return KVWorker(config, worker_id)


class WorkerActor:
    """Ray-facing methods; each forwards to the worker built in the actor's process."""

    def __init__(self, config: WorkerConfig, worker_id: str) -> None:
        logging.basicConfig(level=os.environ.get("KVPOOL_LOG_LEVEL", "WARNING"))
        if config.retain_freed_memory:
            retain_freed_memory()
        self._startup_error: KvpoolError | None = None
        try:
            self._worker = build_worker(config, worker_id)
        except KvpoolError as exc:
            # Kept for `info`, which the gateway calls first: raised from a method it reaches the
            # caller as itself (say, InvalidArgument naming the bad model), where a failing
            # constructor would surface as Ray's ActorDiedError wrapping a remote traceback.
            self._startup_error = exc

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> str:
        return self.info().worker_id

    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> WorkerInfo:
        if self._startup_error is not None:
            raise self._startup_error
        return self._worker.info()

    def tokenizer_files(self) -> dict[str, bytes]:
        return self._worker.tokenizer_files()

    def generate(self, request: WorkRequest) -> Iterator[WorkStarted | TokenEvent | WorkDone]:
        yield WorkStarted(self._worker.worker_id)  # the gateway's prefill deadline starts now
        yield from self._worker.generate(request)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def cancel(self, request_id: str) -> None:
        self._worker.cancel(request_id)

    def prefill(self, token_ids: Sequence[int], tenant: str = "") -> PrefillResult:
        return self._worker.prefill(token_ids, tenant)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._worker.flush(timeout_s)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> WorkerStats:
        return self._worker.stats()

    @ray.method(concurrency_group=CONTROL_GROUP)
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
    remote_cls = ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_THREADS})(WorkerActor)
    remote_cls = remote_cls.options(
        name=ACTOR_NAME_PREFIX + worker_id,
        num_gpus=resources.num_gpus,
        num_cpus=resources.num_cpus,
        max_concurrency=resources.max_concurrency,
        # The gateway replaces dead workers itself (with a fresh id), so Ray must not restart
        # them behind its back: a restarted actor would have an empty L1 under an old route.
        max_restarts=0,
    )
    return remote_cls.remote(config, worker_id)
