"""A KVStore server object: `kvpool store serve` runs one, `kvpool serve` embeds one.

server = StoreServer(StoreConfig(backend="redis://127.0.0.1:6380/0", port=0))
port = server.start()          # port 0: gRPC picks one; read it back here or as .port
...
server.stop()                  # health NOT_SERVING, in-flight calls finish (grace_s)
"""

import logging

from kvpool.errors import KvpoolError
from services.grpc_server import GrpcServer, ServiceSpec
from services.status import ErrorInterceptor
from services.store.backends import StorageBackend, open_backend, redact_url
from services.store.chunks import MESSAGE_MARGIN_BYTES, SERVICE_NAME
from services.store.dataserver import DataPathServer
from services.store.metrics import StoreMetrics
from services.store.service import KVStoreServicer, add_to_server
from services.store.settings import StoreConfig

log = logging.getLogger(__name__)


class StoreServer:
    """The KVStore service on a gRPC server, with its backend and metrics."""

    def __init__(self, config: StoreConfig, *, backend: StorageBackend | None = None) -> None:
        self.config = config
        self._owns_backend = backend is None
        self.backend = backend or open_backend(
            config.backend,
            max_memory_bytes=config.max_memory_bytes,
            redis_password=config.redis_password,
            sessions=config.session_backend,
            session_memory_bytes=config.session_memory_bytes,
        )
        self.metrics = StoreMetrics(self.backend)
        self._servicer = servicer = KVStoreServicer(
            self.backend,
            limits=config.limits,
            metrics=self.metrics,
            default_ttl_s=config.ttl_s,
            backend_threads=config.max_workers,
        )
        self._grpc = GrpcServer(
            [
                ServiceSpec(
                    SERVICE_NAME,
                    lambda server: add_to_server(servicer, server),
                )
            ],
            host=config.host,
            port=config.port,
            max_workers=config.max_workers,
            max_message_bytes=config.limits.chunk_bytes + MESSAGE_MARGIN_BYTES,
            interceptors=[ErrorInterceptor(self.metrics.observe_call)],
            auth=config.auth,
            tls=config.tls,
            reuse_port=config.reuse_port,
            limits=config.connections,
        )
        self._data: DataPathServer | None = None
        if config.data_port >= 0 and config.tls is None:  # it would bypass TLS
            self._data = DataPathServer(
                servicer,
                limits=config.limits,
                auth=config.auth,
                host=config.host,
                port=config.data_port,
                reuse_port=config.reuse_port and config.data_port != 0,
                max_connections=config.data_max_connections,
                observe=self.metrics.observe_call,
            )

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def target(self) -> str:
        """`host:port` for clients (`StoreClient(server.target)`)."""
        return f"{self.config.host}:{self.port}"

    def start(self) -> int:
        """Start serving; returns the bound port. A down backend is logged, not fatal."""
        try:
            self.backend.stats()
        except KvpoolError as exc:
            # Redis may come up after the store (compose, Kubernetes); calls answer UNAVAILABLE
            # until it does, and the pool connects on its own then.
            log.warning("backend not reachable yet: %s", exc)
        # /metrics is bound before gRPC serves: a caller that waits for health SERVING (a
        # readiness probe, a test) may scrape at once.
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.host)
        try:
            port = self._grpc.start()
        except BaseException:
            self.metrics.close_http()
            raise
        if self._data is not None:
            try:
                self._servicer.data_port = self._data.start()
            except BaseException:
                self._grpc.stop(0)
                self.metrics.close_http()
                raise
            log.info("KVStore data path on %s:%d", self.config.host, self._data.port)
        self.metrics.listening = 1
        log.info("KVStore on %s:%d, backend %s", self.config.host, port, self.backend_name)
        return port

    @property
    def data_port(self) -> int | None:
        """The data path's port once started; None when it is off (TLS, or data_port -1)."""
        return self._data.port if self._data is not None and self._data.port else None

    @property
    def backend_name(self) -> str:
        return redact_url(self.config.backend)

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, finish in-flight ones, close."""
        self.metrics.listening = 0
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._data is not None:
            self._data.stop(grace)
        self._grpc.stop(grace)
        self._servicer.close()
        self.metrics.close()
        if self._owns_backend:
            self.backend.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._grpc.wait(timeout_s)

    def __enter__(self) -> "StoreServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_store(config: StoreConfig, *, backend: StorageBackend | None = None) -> StoreServer:
    """A started StoreServer (the caller stops it)."""
    server = StoreServer(config, backend=backend)
    server.start()
    return server
