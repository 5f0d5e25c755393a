"""The one place that assembles a running stack: the KVStore, Ray and the gateway.

`kvpool serve`, `kvpool gateway serve`, `kvpool demo`, the benchmarks and the integration tests
all start their stack here, so the order (store, Ray, gateway), Ray's private temp folder and the
shutdown order are written once. Each `start_*` step registers its own undo; closing runs them in
reverse: the gateway first (open streams finish, workers flush their pending block writes), then
Ray, then the store. A step that fails still lets the earlier ones be undone.

    with Stack() as stack:                               # the steps, for the CLI
        port = stack.start_store(StoreConfig(port=0))
        gpus = stack.start_ray(workers=2)                # joins RAY_ADDRESS when it is set
        stack.start_gateway(GatewaySettings(store_target=stack.store_target, ...))

    with local_stack(WorkerConfig(model="tiny-random"), workers=2) as stack:  # demo, bench, tests
        with stack.client() as client:
            client.generate(prompt="...")

It lives in `services` (the middle layer, docs/architecture.md) so that the services' own
commands can use it as well as the CLI and the benchmarks above them.
"""

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from types import TracebackType
from typing import Any

from services.gateway.client import InferenceClient
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings, PoolConfig
from services.store.processes import StoreSupervisor
from services.store.server import StoreConfig, StoreServer
from workers.api import ActorResources, WorkerConfig

log = logging.getLogger(__name__)

# Ray waits 30 s for a new cluster's GCS to publish its port, and gives up: on a loaded machine
# (a CI box with every core busy) starting it took longer. An operator's own value wins.
RAY_START_WAIT_S = "120"
# Ray starts its worker processes at nice 15; ours run the model, and beside other busy
# processes (a loaded CI box, a node's other services) they got a few per cent of a core each.
RAY_WORKER_NICENESS = "0"


def patient_ray_start() -> None:
    """Settings for a local Ray cluster that this process starts: time to come up on a busy
    machine, and worker actors (the model) at normal priority."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", RAY_START_WAIT_S)
    os.environ.setdefault("RAY_worker_niceness", RAY_WORKER_NICENESS)


# Ray gives a new local node a fixed 30 s to register with its GCS ("The current node timed out
# during startup"); on a loaded machine that can pass. The node it left behind is shut down and
# the start tried once more.
_RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def start_local_ray(**init: Any) -> None:
    """`ray.init(**init)` for a local cluster (with `patient_ray_start`'s settings), tried a
    second time after a startup timeout."""
    import ray

    patient_ray_start()

    try:
        ray.init(**init)
    except Exception as exc:  # Ray raises a bare Exception here
        if not any(text in str(exc) for text in _RAY_START_TIMEOUTS):
            raise
        log.warning("a local Ray cluster did not come up (%s); starting it once more", exc)
        ray.shutdown()
        ray.init(**init)


class Stack:
    """A store (optional: it may run elsewhere), Ray and the gateway, closed in reverse order."""

    def __init__(self) -> None:
        self._undo = contextlib.ExitStack()
        self.store: StoreServer | StoreSupervisor | None = None
        self._gateway: GatewayServer | None = None
        self._remote_ray = False
        self._store_on_loopback = True  # set by start_store from the store's listen address

    def start_store(
        self, config: StoreConfig, *, processes: int = 1, log_level: str = "INFO"
    ) -> int:
        """Serve a KVStore from this process (or `processes` children on one port); its port."""
        store: StoreServer | StoreSupervisor
        if processes > 1:  # docs/store.md, "Several processes"
            store = StoreSupervisor(config, processes, log_level=log_level)
        else:
            store = StoreServer(config)
        port = store.start()
        self._undo.callback(store.stop)
        self.store = store
        self._store_on_loopback = config.host in ("127.0.0.1", "::1", "localhost")
        return port

    @property
    def store_target(self) -> str:
        """HOST:PORT at which the workers reach this stack's store: this node's address when Ray
        put them on other machines (and the store listens beyond loopback), loopback otherwise."""
        if self.store is None:
            raise RuntimeError("this stack runs no store of its own")
        if self._remote_ray and not self._store_on_loopback:
            import ray

            return f"{ray.util.get_node_ip_address()}:{self.store.port}"
        return f"127.0.0.1:{self.store.port}"

    def start_ray(self, workers: int, worker_cpus: float = 1.0, *, private: bool = False) -> float:
        """Start Ray for `workers` actors; returns the cluster's GPUs.

        `private`: a local cluster in a temp folder of its own, with just the CPU slots the
        workers ask for, that never joins or disturbs another (tests, demo, benchmarks).
        Otherwise join RAY_ADDRESS when it is set, or start a local cluster that fits the workers
        even on a small box: they then share the cores rather than wait forever for a slot.
        """
        import ray

        slots = max(1, math.ceil(workers * worker_cpus))
        if private:
            ray_dir = tempfile.mkdtemp(prefix="kvpool-ray-")
            self._undo.callback(shutil.rmtree, ray_dir, ignore_errors=True)
            start_local_ray(
                num_cpus=slots,
                include_dashboard=False,
                _temp_dir=ray_dir,
                log_to_driver=False,
                configure_logging=False,
            )
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            self._remote_ray = True
        else:
            start_local_ray(
                num_cpus=max(os.cpu_count() or 1, slots),
                include_dashboard=False,
                log_to_driver=False,
            )
        self._undo.callback(ray.shutdown)
        return float(ray.cluster_resources().get("GPU", 0.0))

    def start_gateway(self, settings: GatewaySettings) -> GatewayServer:
        """Start the worker actors and serve the gateway (Ray must be started)."""
        gateway = GatewayServer(settings)
        if self.store is not None:
            # One /metrics for the whole process: the embedded store's figures (its backend being
            # up, Redis evictions, calls by status code) would otherwise be exported nowhere.
            store = self.store
            registry = (
                store.registry if isinstance(store, StoreSupervisor) else store.metrics.registry
            )
            gateway.metrics.registry.register(registry)
        self._undo.callback(gateway.stop)
        gateway.start()
        self._gateway = gateway
        return gateway

    @property
    def gateway(self) -> GatewayServer:
        if self._gateway is None:
            raise RuntimeError("the stack's gateway is not started")
        return self._gateway

    def client(self, timeout_s: float = 600.0) -> InferenceClient:
        return InferenceClient(self.gateway.target, timeout_s=timeout_s)

    def flush(self, timeout_s: float = 120.0) -> None:
        """Wait until every worker has written its pending blocks to the store."""
        self.gateway.pool.flush(timeout_s)

    @contextlib.contextmanager
    def drained(self, worker_id: str) -> Iterator[None]:
        """Keep new requests off `worker_id` (so the next one runs elsewhere)."""
        router = self.gateway.pool.router
        router.set_draining(worker_id)
        try:
            yield
        finally:
            router.set_draining(worker_id, False)

    def close(self) -> None:
        """Gateway, Ray, store: each step undone even when an earlier undo raised."""
        self._gateway = None
        self.store = None
        self._undo.close()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def local_stack(
    worker: WorkerConfig,
    *,
    workers: int,
    store: StoreConfig | str | None = None,
    **settings: Any,
) -> Iterator[Stack]:
    """A started stack on this machine alone: the store, a private Ray, `workers` one-CPU worker
    actors and the gateway on a free loopback port.

    `store`: a StoreConfig to serve from this process (default: a 2 GiB memory backend on a
    free port), or the HOST:PORT of a store that runs elsewhere. `settings` are further
    `GatewaySettings` fields (`grace_s`, `http_port`, ...).
    """
    with Stack() as stack:
        if isinstance(store, str):
            target = store
        else:
            stack.start_store(store or StoreConfig(port=0, max_memory_bytes=2 << 30, grace_s=1.0))
            target = stack.store_target
        stack.start_ray(workers, private=True)
        pool = PoolConfig(
            workers=workers,
            worker=replace(worker, store_target=target),
            resources=ActorResources(num_cpus=1),
        )
        stack.start_gateway(GatewaySettings(store_target=target, port=0, pool=pool, **settings))
        yield stack
