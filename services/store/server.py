"""A KVStore server object: `kvpool store serve` runs one, `kvpool serve` embeds one.

server = StoreServer(StoreConfig(backend="redis://127.0.0.1:6380/0", port=0))
port = server.start()          # port 0: gRPC picks one; read it back here or as .port
...
server.stop()                  # health NOT_SERVING, in-flight calls finish (grace_s)
"""

import logging
from dataclasses import dataclass, field

from kvpool.errors import KvpoolError
from services.auth import ServerTls, TokenTable
from services.grpc_server import GrpcServer, ServiceSpec
from services.status import ErrorInterceptor
from services.store.backends import StorageBackend, check_backend_spec, open_backend, redact_url
from services.store.chunks import MESSAGE_MARGIN_BYTES, SERVICE_NAME
from services.store.metrics import StoreMetrics
from services.store.service import KVStoreServicer, StoreLimits, add_to_server
from services.watchdog import ConnectionLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str = "memory"  # "memory" or redis://, rediss://, unix:// URL
    host: str = "127.0.0.1"
    port: int = 50052  # 0: let gRPC pick a free port
    ttl_s: int | None = None  # default TTL of a Put that names none; None: keep until evicted
    limits: StoreLimits = field(default_factory=StoreLimits)
    max_memory_bytes: int = 1 << 30  # memory backend only
    redis_password: str | None = None  # when not in the URL (keeps it out of process listings)
    metrics_port: int = 0  # 0: no /metrics endpoint
    grace_s: float = 10.0
    max_workers: int = 16
    auth: TokenTable | None = None  # when set, calls need `authorization: Bearer <token>`
    tls: ServerTls | None = None  # when set, serve TLS only
    reuse_port: bool = False  # SO_REUSEPORT: set in each process of `--processes N`

    def __post_init__(self) -> None:
        check_backend_spec(self.backend)
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be between 0 and 65535")
        if self.ttl_s is not None and self.ttl_s < 0:
            raise ValueError(f"ttl_s must be positive (or None for no TTL), got {self.ttl_s}")
        if self.max_memory_bytes <= 0 or self.grace_s < 0 or self.max_workers <= 0:
            raise ValueError("max_memory_bytes and max_workers must be positive, grace_s >= 0")

    @property
    def connections(self) -> ConnectionLimits:
        return ConnectionLimits(
            # The servicer ends its calls at max_call_s itself; this is the backstop.
            max_call_s=self.limits.max_call_s + 1.0,
            idle_s=self.limits.idle_s,
            max_queued_rpcs=self.limits.max_queued_rpcs,
            stream_window_bytes=self.limits.stream_window_bytes,
        )


class StoreServer:
    """The KVStore service on a gRPC server, with its backend and metrics."""

    def __init__(self, config: StoreConfig, *, backend: StorageBackend | None = None) -> None:
        self.config = config
        self._owns_backend = backend is None
        self.backend = backend or open_backend(
            config.backend,
            max_memory_bytes=config.max_memory_bytes,
            redis_password=config.redis_password,
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
        port = self._grpc.start()
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.host)
        log.info("KVStore on %s:%d, backend %s", self.config.host, port, self.backend_name)
        return port

    @property
    def backend_name(self) -> str:
        return redact_url(self.config.backend)

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, finish in-flight ones, close."""
        self._grpc.stop(self.config.grace_s if grace_s is None else grace_s)
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
