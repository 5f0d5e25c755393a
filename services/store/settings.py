"""The KVStore's settings record, light to import (no grpc): `kvpool store serve` and
`kvpool serve` read their flags' defaults from its fields, and `StoreServer` is built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.store.backends import check_backend_spec
from services.store.limits import StoreLimits

if TYPE_CHECKING:
    from services.auth import ServerTls, TokenTable
    from services.watchdog import ConnectionLimits


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str = "memory"  # "memory" or redis://, rediss://, unix:// URL
    host: str = "127.0.0.1"
    port: int = 50052  # 0: let gRPC pick a free port
    ttl_s: int | None = None  # default TTL of a Put that names none; None: keep until evicted
    limits: StoreLimits = field(default_factory=StoreLimits)
    max_memory_bytes: int = 1 << 30  # memory backend only
    # Session records, kept apart from blocks so no block eviction reaches them (backends/
    # split.py): "memory", a Redis URL (run it with noeviction), or None: an in-process space
    # with the memory backend, the blocks' Redis otherwise.
    session_backend: str | None = None
    session_memory_bytes: int = 64 << 20  # the in-process session space, which never evicts
    redis_password: str | None = None  # when not in the URL (keeps it out of process listings)
    metrics_port: int = 0  # 0: no /metrics endpoint
    grace_s: float = 10.0
    max_workers: int = 16
    auth: TokenTable | None = None  # when set, calls need `authorization: Bearer <token>`
    tls: ServerTls | None = None  # when set, serve TLS only
    reuse_port: bool = False  # SO_REUSEPORT: set in each process of `--processes N`
    # The data path for Get and Lookup beside gRPC (services/store/dataserver.py): its TCP port,
    # advertised through Stats; 0 picks a free one (per process), -1 turns it off. Always off
    # with TLS, which it would bypass.
    data_port: int = 0
    data_max_connections: int = 64  # data path connections open at once, per process

    def __post_init__(self) -> None:
        check_backend_spec(self.backend)
        if self.session_backend is not None:
            check_backend_spec(self.session_backend)
        if self.session_memory_bytes <= 0:
            raise ValueError(
                f"session_memory_bytes must be positive, got {self.session_memory_bytes}"
            )
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be between 0 and 65535")
        if not -1 <= self.data_port <= 65535 or self.data_max_connections <= 0:
            raise ValueError(
                f"data_port must be -1 (off) to 65535 and data_max_connections positive, got "
                f"{self.data_port} and {self.data_max_connections}"
            )
        if self.ttl_s is not None and self.ttl_s < 0:
            raise ValueError(f"ttl_s must be positive (or None for no TTL), got {self.ttl_s}")
        if self.max_memory_bytes <= 0 or self.grace_s < 0 or self.max_workers <= 0:
            raise ValueError("max_memory_bytes and max_workers must be positive, grace_s >= 0")

    @property
    def connections(self) -> ConnectionLimits:
        from services.watchdog import ConnectionLimits  # grpc, only when a server starts

        return ConnectionLimits(
            # The servicer ends its calls at max_call_s itself; this is the backstop.
            max_call_s=self.limits.max_call_s + 1.0,
            idle_s=self.limits.idle_s,
            max_queued_rpcs=self.limits.max_queued_rpcs,
            stream_window_bytes=self.limits.stream_window_bytes,
        )
