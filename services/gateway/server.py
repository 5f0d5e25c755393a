"""The gateway as an object: workers, router, sessions, the gRPC server and its metrics.

    gateway = GatewayServer(GatewaySettings(store_target="127.0.0.1:50052", port=0))
    port = gateway.start()   # Ray must be initialized; starts the worker actors
    ...
    gateway.stop()           # NOT_SERVING, in-flight streams finish, workers flush and stop

`kvpool gateway serve` runs one on its own; `kvpool serve` and `kvpool demo` embed one next to
an in-process store.
"""

import logging
from dataclasses import dataclass, field, replace

from kvpool.v1 import inference_pb2_grpc
from services.auth import ServerTls, TokenTable, channel_credentials
from services.gateway.inference import GatewayConfig, InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import PoolConfig, WorkerPool, call
from services.gateway.router import Router, RouterConfig
from services.gateway.servicer import SERVICE_NAME, InferenceServicer
from services.gateway.sessions import SessionStore
from services.grpc_server import GrpcServer, ServiceSpec
from services.status import ErrorInterceptor
from services.store.client import StoreClient
from workers.worker import WorkerStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    store_target: str  # HOST:PORT of the KVStore, reachable from the gateway and every worker
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    pool: PoolConfig = field(default_factory=PoolConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    route_load_penalty_tokens: int = 512
    session_ttl_s: int = 24 * 3600
    store_timeout_s: float = 5.0
    metrics_port: int = 0  # 0: no /metrics endpoint
    max_concurrent_rpcs: int = 64  # gRPC handler threads; each open stream holds one
    grace_s: float = 30.0
    auth: TokenTable | None = None  # tokens callers must present, each with its tenant
    tls: ServerTls | None = None
    store_auth_token: str | None = field(default=None, repr=False)  # the store's, for sessions
    store_tls_ca: bytes | None = field(default=None, repr=False)  # PEM CA: store over TLS
    max_request_bytes: int = 4 << 20  # larger requests get RESOURCE_EXHAUSTED from gRPC
    max_requests_per_worker: int = 0  # 0: no limit

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be between 0 and 65535")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if (
            self.auth is not None
            and self.store_auth_token
            and self.auth.tenant_for(f"Bearer {self.store_auth_token}") is not None
        ):
            raise ValueError(
                "the store's token must not be a token the gateway accepts: its clients could "
                "then reach the store and every tenant's blocks; give the store its own "
                "(KVPOOL_STORE_AUTH_TOKEN)"
            )
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")


class GatewayServer:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        worker = settings.pool.worker
        self.router = Router(
            RouterConfig(
                block_tokens=worker.block_tokens,
                load_penalty_tokens=settings.route_load_penalty_tokens,
                # Remember about as many blocks per worker as its L1 can hold (at int8 sizes the
                # record overestimates a little, which only costs an occasional store fetch).
                record_blocks=max(1024, worker.l1_bytes // (256 << 10)),
                max_in_flight=settings.max_requests_per_worker,
            )
        )
        self.pool = WorkerPool(_with_store_credentials(settings), self.router)
        self.store = StoreClient(
            settings.store_target,
            timeout_s=settings.store_timeout_s,
            auth_token=settings.store_auth_token,
            credentials=channel_credentials(settings.store_tls_ca),
        )
        self.metrics = GatewayMetrics()
        self.core = InferenceCore(
            self.pool,
            SessionStore(self.store, ttl_s=settings.session_ttl_s),
            self.metrics,
            settings.gateway,
        )
        self._grpc = inference_server(settings, self.core, self.metrics)
        self._metrics_server = None
        self._stopped = False

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def target(self) -> str:
        """`host:port` for clients on this machine."""
        host = (
            "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "[::]") else self.settings.host
        )
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Start the workers (waiting for their models), then serve; returns the bound port."""
        info = self.pool.start()
        log.info(
            "%d workers serving %s (fingerprint %s, codec %s, %d-token blocks)",
            len(self.pool.live()), info.model, info.fingerprint[:12], info.codec, info.block_tokens,
        )  # fmt: skip
        self.metrics.watch_workers(
            self.worker_stats, lambda: len(self.pool.live()), lambda: self.pool.deaths
        )
        port = self._grpc.start()
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        return port

    def worker_stats(self, timeout_s: float = 2.0) -> list[WorkerStats]:
        """Each live worker's stats; workers that do not answer in time are left out."""
        stats = []
        for handle in self.pool.live().values():
            try:
                stats.append(call(handle.stats.remote(), timeout_s))
            except Exception:  # a dead or busy worker is absent from this scrape
                continue
        return stats

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, in-flight streams finish, workers flush their writes, stop."""
        if self._stopped:
            return
        self._stopped = True
        self._grpc.stop(self.settings.grace_s if grace_s is None else grace_s)
        self.pool.close()
        self.store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._grpc.wait(timeout_s)


def inference_server(
    settings: GatewaySettings, core: InferenceCore, metrics: GatewayMetrics
) -> GrpcServer:
    """The gRPC front of a gateway: auth, TLS, the request size limit, errors, metrics."""
    return GrpcServer(
        [
            ServiceSpec(
                SERVICE_NAME,
                lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(
                    InferenceServicer(core, settings.auth), server
                ),
            )
        ],
        host=settings.host,
        port=settings.port,
        max_workers=settings.max_concurrent_rpcs,
        max_message_bytes=settings.max_request_bytes,
        interceptors=[ErrorInterceptor(metrics.observe_call)],
        auth=settings.auth,
        tls=settings.tls,
    )


def _with_store_credentials(settings: GatewaySettings) -> PoolConfig:
    """The pool config, its workers reaching the store as the gateway does unless told otherwise."""
    worker = settings.pool.worker
    return replace(
        settings.pool,
        worker=replace(
            worker,
            store_auth_token=worker.store_auth_token or settings.store_auth_token,
            store_tls_ca=worker.store_tls_ca or settings.store_tls_ca,
            # The gateway routes by the hashes the workers store under: one secret for both.
            namespace_secret=worker.namespace_secret or settings.gateway.namespace_secret,
        ),
    )
