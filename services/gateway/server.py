"""The gateway as an object: workers (with their router), sessions, the gRPC server and its
metrics, and (with `http_port`) the OpenAI-compatible HTTP API on the same core
(`services/gateway/http`).

    gateway = GatewayServer(GatewaySettings(store_target="127.0.0.1:50052", port=0))
    port = gateway.start()   # Ray must be initialized; starts the worker actors
    ...
    gateway.stop()           # NOT_SERVING, in-flight streams finish, workers flush and stop

`kvpool gateway serve` runs one on its own; `kvpool serve` and `kvpool demo` embed one next to
an in-process store.
"""

import logging
from collections.abc import Callable
from dataclasses import replace

from kvpool.v1 import inference_pb2_grpc
from services.aio_server import AioGrpcServer, CallerLimits
from services.auth import channel_credentials
from services.gateway.core import InferenceCore
from services.gateway.http.app import OpenAIApp
from services.gateway.http.connections import PeerConnections
from services.gateway.http.server import HttpServer
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import WorkerPool
from services.gateway.servicer import SERVICE_NAME, InferenceServicer
from services.gateway.sessions import SessionStore
from services.gateway.settings import GatewaySettings, PoolConfig
from services.grpc_server import ServiceSpec
from services.quota import CallerQuota
from services.store.client import StoreClient
from services.watchdog import ConnectionLimits

log = logging.getLogger(__name__)


class GatewayServer:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.pool = WorkerPool(_with_store_credentials(settings))  # the workers and their router
        self.store = StoreClient(
            settings.store_target,
            timeout_s=settings.store_timeout_s,
            auth_token=settings.store_auth_token,
            credentials=channel_credentials(settings.store_tls_ca),
        )
        self.metrics = GatewayMetrics()
        self.core = InferenceCore(
            self.pool,
            SessionStore(
                self.store,
                ttl_s=settings.session_ttl_s,
                secret=settings.pool.worker.namespace_secret,  # the deployment's, as for blocks
            ),
            self.metrics,
            settings.gateway,
            tenants=served_tenants(settings),
        )
        # One count of open calls per tenant for both fronts: a tenant's gRPC and HTTP calls
        # share its quota (--max-calls-per-tenant).
        self.quota = caller_quota(settings)
        self._grpc = inference_server(settings, self.core, self.metrics, self.quota)
        self._metrics_server = None
        self._http: HttpServer | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def http_port(self) -> int | None:
        """The HTTP API's bound port; None when it is off (or not started)."""
        return None if self._http is None else self._http.port

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
            self.pool.stats, lambda: len(self.pool.live()), lambda: self.pool.deaths
        )
        # /metrics first, gRPC last: once health says SERVING, every port answers.
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port,
                addr=self.settings.metrics_host,
                registry=self.metrics.registry,
            )
        if self.settings.http_port is not None:
            self._http = http_server(
                self.settings, self.core, info.model, self._serving, self.quota
            )
            self._http.start()
        try:
            return self._grpc.start()
        except BaseException:
            self.stop(grace_s=0)
            raise

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, in-flight streams finish, workers flush their writes, stop."""
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.settings.grace_s if grace_s is None else grace_s
        if self._http is not None:
            self._http.begin_stop()  # both fronts stop taking calls at once, then drain
        self._grpc.stop(grace_s)
        if self._http is not None:
            self._http.stop(grace_s)
        self.pool.close()
        self.store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._grpc.wait(timeout_s)

    def _serving(self) -> bool:
        return not self._stopped


def served_tenants(settings: GatewaySettings) -> int:
    """How many tenants the token file names (the default tenant counts); 1 with auth off, where
    tenants are whatever requests name."""
    return 1 if settings.auth is None else len(set(settings.auth.tenants.values()))


def caller_quota(settings: GatewaySettings) -> CallerQuota:
    limits = caller_limits(settings)
    return CallerQuota(limits.max_calls_per_caller, limits.max_calls)


def caller_limits(settings: GatewaySettings) -> CallerLimits:
    return CallerLimits(
        request_timeout_s=settings.request_timeout_s,
        max_calls_per_caller=settings.max_calls_per_tenant,
    )


def inference_server(
    settings: GatewaySettings,
    core: InferenceCore,
    metrics: GatewayMetrics,
    quota: CallerQuota | None = None,
) -> AioGrpcServer:
    """The gRPC front of a gateway: auth, TLS, the request size limit, per-tenant limits, errors,
    metrics."""
    return AioGrpcServer(
        [
            ServiceSpec(
                SERVICE_NAME,
                lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(
                    InferenceServicer(core, settings.auth, settings.max_concurrent_rpcs),
                    server,  # type: ignore[arg-type]
                ),
            )
        ],
        host=settings.host,
        port=settings.port,
        max_message_bytes=settings.max_request_bytes,
        auth=settings.auth,
        tls=settings.tls,
        limits=ConnectionLimits(idle_s=settings.idle_timeout_s),
        callers=caller_limits(settings),
        quota=quota,
        observer=metrics.observe_call,
    )


def http_server(
    settings: GatewaySettings,
    core: InferenceCore,
    model: str,
    serving: Callable[[], bool],
    quota: CallerQuota | None = None,
) -> HttpServer:
    """The OpenAI-compatible HTTP front: the gRPC front's host, auth, TLS and limits."""
    app = OpenAIApp(
        core,
        model=model,
        auth=settings.auth,
        max_request_bytes=settings.max_request_bytes,
        max_concurrent=settings.max_concurrent_rpcs,
        serving=serving,
        quota=quota,
        body_timeout_s=settings.request_timeout_s,
    )
    return HttpServer(
        app,
        host=settings.host,
        port=settings.http_port or 0,
        grace_s=settings.grace_s,
        tls=settings.tls,
        connections=PeerConnections(
            settings.max_connections_per_peer, settings.max_http_connections
        ),
        header_timeout_s=settings.http_header_timeout_s,
        keepalive_s=settings.http_keepalive_s,
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
        ),
    )
