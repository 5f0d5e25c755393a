"""The whole stack inside one process, for `kvpool demo` and `kvpool bench ttft`.

    with EmbeddedStack(workers=2, model="smollm2-135m") as stack:
        with stack.client() as client:
            client.generate(prompt="...")

A KVStore on the memory backend and the gateway listen on free loopback ports; Ray runs a local
cluster in a temporary folder that is removed afterwards. Closing shuts everything down in order:
gateway (streams finish, workers flush), Ray, store.
"""

import contextlib
import shutil
import tempfile
from types import TracebackType

from services.gateway.client import InferenceClient
from services.gateway.pool import PoolConfig, call
from services.gateway.server import GatewayServer, GatewaySettings
from services.store.server import StoreConfig, StoreServer
from workers.actor import ActorResources
from workers.node_tier import DEFAULT_NODE_TIER_BYTES
from workers.worker import WorkerConfig


class EmbeddedStack:
    def __init__(
        self,
        *,
        workers: int = 2,
        model: str = "smollm2-135m",
        codec: str = "int8",
        block_tokens: int = 64,
        store_memory_bytes: int = 2 << 30,
        node_tier_bytes: int = DEFAULT_NODE_TIER_BYTES,
    ) -> None:
        self._node_tier_bytes = node_tier_bytes
        self._workers = workers
        self._worker = WorkerConfig(model=model, codec=codec, block_tokens=block_tokens)
        self._store_memory_bytes = store_memory_bytes
        self.store: StoreServer | None = None
        self._gateway: GatewayServer | None = None
        self._ray_dir: str | None = None

    def start(self) -> "EmbeddedStack":
        import ray

        self.store = StoreServer(
            StoreConfig(port=0, max_memory_bytes=self._store_memory_bytes, grace_s=1.0)
        )
        self.store.start()
        self._ray_dir = tempfile.mkdtemp(prefix="kvpool-ray-")
        ray.init(
            num_cpus=max(self._workers, 1),
            include_dashboard=False,
            _temp_dir=self._ray_dir,
            log_to_driver=False,
            configure_logging=False,
        )
        worker = WorkerConfig(
            model=self._worker.model,
            codec=self._worker.codec,
            block_tokens=self._worker.block_tokens,
            store_target=self.store.target,
        )
        self._gateway = GatewayServer(
            GatewaySettings(
                store_target=self.store.target,
                port=0,
                pool=PoolConfig(
                    workers=self._workers,
                    worker=worker,
                    resources=ActorResources(num_cpus=1),
                    node_tier_bytes=self._node_tier_bytes,
                ),
                grace_s=5.0,
            )
        )
        self._gateway.start()
        return self

    def client(self, timeout_s: float = 600.0) -> InferenceClient:
        return InferenceClient(self.gateway.target, timeout_s=timeout_s)

    @property
    def gateway(self) -> GatewayServer:
        if self._gateway is None:
            raise RuntimeError("the stack is not started")
        return self._gateway

    def flush(self) -> None:
        """Wait until every worker has written its pending blocks to the store."""
        for handle in self.gateway.pool.live().values():
            call(handle.flush.remote(), 120)

    @contextlib.contextmanager
    def drained(self, worker_id: str):
        """Keep new requests off `worker_id` (so the next one runs elsewhere)."""
        self.gateway.router.set_draining(worker_id)
        try:
            yield
        finally:
            self.gateway.router.set_draining(worker_id, False)

    def close(self) -> None:
        import ray

        if self._gateway is not None:
            self._gateway.stop(5.0)
            self._gateway = None
        if ray.is_initialized():
            ray.shutdown()
        if self.store is not None:
            self.store.stop(1.0)
            self.store = None
        if self._ray_dir is not None:
            shutil.rmtree(self._ray_dir, ignore_errors=True)
            self._ray_dir = None

    def __enter__(self) -> "EmbeddedStack":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
