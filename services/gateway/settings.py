"""The gateway's settings as plain records: what `GatewayServer`, the core and the pool are given.

Kept apart from the modules that use them, and light to import (no Ray, grpc or torch), so that
the command line reads each flag's default from its field here (services/gateway/cli.py) while
`kvpool --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from services.gateway.router import RouterConfig
from workers.api import ActorResources, WorkerConfig
from workers.kv.bounds import DEFAULT_SINK_TOKENS
from workers.node_tier import DEFAULT_NODE_TIER_BYTES

# Actor threads beyond a full batch: Prefill calls and tokenizer fetches, which the gateway's
# per-worker cap does not count, so they never wait behind a full batch of streams.
SPARE_THREADS = 2

if TYPE_CHECKING:
    from services.auth import ServerTls, TokenTable


_ROUTER = RouterConfig()  # the router's defaults are the gateway's: one default per setting


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The workers the pool starts and the router it builds for them (`routing`)."""

    workers: int = 1
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    resources: ActorResources = field(default_factory=ActorResources)
    start_timeout_s: float = 600.0  # model load in a fresh process, conversion included
    replace_dead: bool = True
    # A replacement that does not start (no free GPU yet, a node going away) is killed and tried
    # again after replace_backoff_s, doubling each time up to 60 s, replace_attempts times in all.
    replace_attempts: int = 6
    replace_backoff_s: float = 2.0
    # Bytes of each node's tier (L2, workers.node_tier), shared by the node's workers; 0: none.
    node_tier_bytes: int = DEFAULT_NODE_TIER_BYTES
    # Routing: a worker with a full batch (max_requests_per_worker in flight) costs as much as
    # this many cached prefix tokens (router.RouterConfig says why the default is what it is).
    route_load_penalty_tokens: int = _ROUTER.load_penalty_tokens
    # Requests one worker runs at once: its batch's admission bound; more wait at the gateway
    # (router.RouterConfig). At most the worker's max_batch (0: that), so no request waits inside
    # a worker, where the wait would count against --token-timeout; the actor's threads leave
    # room for it (actor_resources).
    max_requests_per_worker: int = 0
    # Requests waiting for a worker (past it RESOURCE_EXHAUSTED), and the longest one waits.
    max_queued_requests: int = _ROUTER.max_queued
    queue_timeout_s: float = _ROUTER.queue_timeout_s

    @property
    def requests_per_worker(self) -> int:
        """The per-worker cap in force: never more than the worker's batch admits at once."""
        return self.max_requests_per_worker or self.worker.max_batch

    @property
    def routing(self) -> RouterConfig:
        """What the pool builds its router with: the knobs above, and the workers' blocks."""
        return RouterConfig(
            block_tokens=self.worker.block_tokens,
            load_penalty_tokens=self.route_load_penalty_tokens,
            # Remember about as many blocks per worker as its L1 can hold (at int8 sizes the
            # record overestimates a little, which only costs an occasional store fetch).
            record_blocks=max(1024, self.worker.l1_bytes // (256 << 10)),
            max_in_flight=self.requests_per_worker,
            max_queued=self.max_queued_requests,
            queue_timeout_s=self.queue_timeout_s,
        )

    @property
    def actor_resources(self) -> ActorResources:
        """`resources`, with threads enough for a full batch plus SPARE_THREADS beside it."""
        threads = self.worker.max_batch + SPARE_THREADS
        if self.resources.max_concurrency >= threads:
            return self.resources
        return replace(self.resources, max_concurrency=threads)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.node_tier_bytes < 0:
            raise ValueError(
                f"node_tier_bytes must be >= 0 (0: no node tier), got {self.node_tier_bytes}"
            )
        if self.replace_attempts < 1 or self.replace_backoff_s < 0:
            raise ValueError(
                f"replace_attempts must be >= 1 and replace_backoff_s >= 0, got "
                f"{self.replace_attempts} and {self.replace_backoff_s}"
            )
        batch = self.worker.max_batch
        if not 0 <= self.max_requests_per_worker <= batch:
            raise ValueError(
                f"max_requests_per_worker must be between 0 (the worker's max_batch) and the "
                f"worker's max_batch of {batch}, got {self.max_requests_per_worker}"
            )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_failovers: int = 3
    # A worker silent for this long between two tokens, or before it takes a request up, is
    # treated as dead: killed and replaced. The clock starts when the worker starts the request,
    # never while the request waits (docs/gateway.md, "Timeouts").
    token_timeout_s: float = 300.0
    # The time a worker may take from starting a request to its first token. Past it the request
    # fails with RESOURCE_EXHAUSTED and is not tried elsewhere: a slow prefill is the request's
    # doing, not the worker's, so the worker is neither killed nor replaced.
    prefill_timeout_s: float = 120.0
    # The longest prompt, a session's history included (0: the model's context). A request with
    # a bounded cache (max_cache_tokens) may run past the model's context, up to this; any other
    # request must also fit the model's context with its max_new_tokens.
    max_prompt_tokens: int = 32768
    max_new_tokens: int = 0  # 0: none beyond MAX_NEW_TOKENS_LIMIT
    # Stop strings: how many one request may give, and how long each may be (characters).
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    # Requests one tenant may run on workers (or wait for one in the router's queue) at once;
    # 0: with a token file of several tenants, the pool's slots less a quarter
    # (services.gateway.shares), so another tenant always finds one; else no limit.
    max_requests_per_tenant: int = 0
    max_sessions: int = 0  # live sessions this gateway has opened and not seen expire
    max_sessions_per_tenant: int = 0  # of those, one tenant's (0: only max_sessions)
    # The cache bound of requests that name none (and are not in a session that has one).
    max_cache_tokens: int = 0  # 0: unbounded
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")
        for name in ("token_timeout_s", "prefill_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_prompt_tokens",
            "max_new_tokens",
            "max_requests_per_tenant",
            "max_sessions",
            "max_sessions_per_tenant",
            "max_cache_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if self.max_stop_strings < 0 or self.max_stop_chars < 1:
            raise ValueError(
                f"max_stop_strings must be >= 0 and max_stop_chars >= 1, got "
                f"{self.max_stop_strings} and {self.max_stop_chars}"
            )


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    store_target: str  # HOST:PORT of the KVStore, reachable from the gateway and every worker
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    pool: PoolConfig = field(default_factory=PoolConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    session_ttl_s: int = 24 * 3600
    store_timeout_s: float = 5.0
    metrics_port: int = 0  # 0: no /metrics endpoint
    # Where /metrics listens: its series name tenants, so loopback unless told (Prometheus on
    # another host: give its network's address, and keep the port off the public network).
    metrics_host: str = "127.0.0.1"
    # The OpenAI-compatible HTTP API (services/gateway/http): None: off; 0: a free port.
    http_port: int | None = None
    # Threads stepping the core (each front has its own): a generation holds one while it
    # waits for its next token; a call waiting on its client holds none.
    max_concurrent_rpcs: int = 64
    # Calls one tenant (its token's; its peer address with auth off) may have open at once,
    # gRPC and HTTP together, waiting for their request or not; more get RESOURCE_EXHAUSTED.
    max_calls_per_tenant: int = 32
    request_timeout_s: float = 10.0  # for a gRPC call to send its request message (0: none)
    # A stream its client does not read (or a request stream that sends nothing) for this long
    # is cancelled, and its generation with it (0: never).
    idle_timeout_s: float = 30.0
    # The HTTP API's connections (services/gateway/http/connections.py): a request's headers
    # must be complete this long after the connection opens or the last response ends; an idle
    # connection between requests is closed after http_keepalive_s; one peer address holds at
    # most max_connections_per_peer (behind a proxy, that is the proxy: 0 turns it off), every
    # peer together max_http_connections.
    http_header_timeout_s: float = 10.0
    http_keepalive_s: float = 5.0
    max_connections_per_peer: int = 32
    max_http_connections: int = 4096
    grace_s: float = 30.0
    auth: TokenTable | None = None  # tokens callers must present, each with its tenant
    tls: ServerTls | None = None
    store_auth_token: str | None = field(default=None, repr=False)  # the store's, for sessions
    store_tls_ca: bytes | None = field(default=None, repr=False)  # PEM CA: store over TLS
    max_request_bytes: int = 4 << 20  # larger requests get RESOURCE_EXHAUSTED from gRPC

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be between 0 and 65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be between 0 and 65535, got {self.http_port}")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        for name in (
            "max_calls_per_tenant",
            "request_timeout_s",
            "idle_timeout_s",
            "http_header_timeout_s",
            "max_connections_per_peer",
            "max_http_connections",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
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
        if self.http_keepalive_s < 1:
            raise ValueError(f"http_keepalive_s must be >= 1, got {self.http_keepalive_s}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
