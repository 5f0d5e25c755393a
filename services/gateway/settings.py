"""The gateway's settings as plain records: what `GatewayServer`, the core and the pool are given.

Kept apart from the modules that use them, and light to import (no Ray, grpc or torch), so that
the command line reads each flag's default from its field here (services/gateway/cli.py) while
`kvpool --help` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.api import ActorResources, WorkerConfig
from workers.kv.bounds import DEFAULT_SINK_TOKENS

if TYPE_CHECKING:
    from services.auth import ServerTls, TokenTable


@dataclass(frozen=True, slots=True)
class PoolConfig:
    workers: int = 1
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    resources: ActorResources = field(default_factory=ActorResources)
    start_timeout_s: float = 600.0  # model load in a fresh process, conversion included
    replace_dead: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_failovers: int = 3
    # A worker silent for this long between two tokens is treated as dead: killed and replaced.
    token_timeout_s: float = 300.0
    # Limits (0: none beyond the model's context). A prompt counts a session's history too.
    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    max_sessions: int = 0  # live sessions this gateway has opened and not seen expire
    # The cache bound of requests that name none (and are not in a session that has one).
    max_cache_tokens: int = 0  # 0: unbounded
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        if self.max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0, got {self.max_failovers}")
        if self.token_timeout_s <= 0:
            raise ValueError(f"token_timeout_s must be > 0, got {self.token_timeout_s}")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_sessions", "max_cache_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")


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
    # The OpenAI-compatible HTTP API (services/gateway/http): None: off; 0: a free port.
    http_port: int | None = None
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
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be between 0 and 65535, got {self.http_port}")
        if self.session_ttl_s <= 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
