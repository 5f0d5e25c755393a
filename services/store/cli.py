"""`kvpool store serve`: run the KVStore gRPC service until SIGTERM or SIGINT.

Every flag `--some-flag` can also be set as the environment variable `KVPOOL_SOME_FLAG`; the flag
wins. Byte sizes take an optional KiB/MiB/GiB suffix.
"""

import argparse
import logging
import re
from collections.abc import Callable

from kvpool.config import env_default
from services.auth_flags import add_store_server_flags
from services.store.limits import StoreLimits
from services.store.processes import AUTO_MAX_PROCESSES, Supervision
from services.store.settings import StoreConfig

_CONFIG = StoreConfig()  # every flag's default is its field's
_LIMITS = StoreLimits()

_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|K|M|G)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864; plain integers are bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a number with KiB, MiB or GiB"
        )
    return int(match[1]) * _UNITS[(match[2] or "").lower()]


def format_size(size: int) -> str:
    """1073741824 -> '1GiB': the largest unit that divides `size`."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _flag_adder(parser: argparse.ArgumentParser) -> Callable[..., None]:
    def flag(name: str, default: object, **kwargs: object) -> None:
        parser.add_argument(name, default=env_default(name, default), **kwargs)  # type: ignore[arg-type]

    return flag


def configure(parser: argparse.ArgumentParser) -> None:
    _backend_flags(parser)
    _limit_flags(parser)
    _server_flags(parser)


def _backend_flags(parser: argparse.ArgumentParser) -> None:
    """Where blocks and sessions live, their TTL, and how large a block or a call may be."""
    flag = _flag_adder(parser)
    flag(
        "--backend",
        _CONFIG.backend,
        help="'memory' (in-process LRU) or a Redis URL: redis://[user:password@]host:port/db, "
        "rediss://... (TLS), unix:///path/to/socket, or a Redis Cluster: "
        "redis+cluster://[user:password@]host:port[,host:port...] (rediss+cluster:// for TLS) "
        f"(default: {_CONFIG.backend})",
    )
    flag("--host", _CONFIG.host, help="address to listen on (0.0.0.0 in containers)")
    flag(
        "--port",
        _CONFIG.port,
        type=int,
        help=f"gRPC port (0 picks a free one; default {_CONFIG.port})",
    )
    flag("--ttl", 0, type=int, help="default TTL in seconds of stored blocks (0: none)")
    flag(
        "--max-block-bytes",
        format_size(_LIMITS.max_block_bytes),
        type=parse_size,
        help="largest block a Put may store",
    )
    flag("--max-keys", _LIMITS.max_keys, type=int, help="most keys in one Lookup, Get or Delete")
    flag(
        "--max-memory-bytes",
        format_size(_CONFIG.max_memory_bytes),
        type=parse_size,
        help="memory backend's byte bound",
    )
    flag(
        "--session-backend",
        None,
        help="where session records live, apart from blocks so that no block eviction reaches "
        "them: 'memory' or a Redis URL (run that Redis with noeviction). Default: an in-process "
        "space with the memory backend, the blocks' Redis otherwise (docs/store.md, 'Sessions')",
    )
    flag(
        "--session-memory-bytes",
        format_size(_CONFIG.session_memory_bytes),
        type=parse_size,
        help="bound of the in-process session space, which never evicts: a session that does "
        "not fit is refused RESOURCE_EXHAUSTED",
    )


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    """How much a call may move and hold, and for how long."""
    flag = _flag_adder(parser)
    flag(
        "--chunk-bytes",
        format_size(_LIMITS.chunk_bytes),
        type=parse_size,
        help="piece size of streamed values",
    )
    flag(
        "--max-inflight-bytes",
        str(_LIMITS.max_inflight_bytes),
        type=parse_size,
        help="value bytes all calls together may hold at once; calls wait for room "
        f"(default {_LIMITS.max_inflight_bytes >> 20}MiB; docs/store.md, 'Memory bound')",
    )
    flag(
        "--max-call-seconds",
        _LIMITS.max_call_s,
        type=float,
        help="no call runs longer, whatever its client's deadline (default "
        f"{_LIMITS.max_call_s:g})",
    )
    flag(
        "--idle-seconds",
        _LIMITS.idle_s,
        type=float,
        help="cancel a stream that waits this long on its client (0: never; default "
        f"{_LIMITS.idle_s:g})",
    )


def _server_flags(parser: argparse.ArgumentParser) -> None:
    """Security, the data path, metrics, shutdown, workers and processes."""
    flag = _flag_adder(parser)
    flag(
        "--redis-password",
        None,
        help="Redis password when not in the URL (prefer env KVPOOL_REDIS_PASSWORD)",
    )
    add_store_server_flags(parser)  # docs/store.md, "Security"
    flag(
        "--data-port",
        _CONFIG.data_port,
        type=int,
        help="TCP port of the data path for Get and Lookup beside gRPC, advertised through Stats "
        "(0: a free one per process; -1: off; always off with TLS). docs/store.md, 'The data path'",
    )
    flag(
        "--data-max-connections",
        _CONFIG.data_max_connections,
        type=int,
        help="data path connections open at once per process; more are refused (default "
        f"{_CONFIG.data_max_connections})",
    )
    flag("--metrics-port", 0, type=int, help="Prometheus /metrics port (0: off)")
    flag("--grace", _CONFIG.grace_s, type=float, help="seconds in-flight calls get on shutdown")
    flag(
        "--max-workers",
        _CONFIG.max_workers,
        type=int,
        help="concurrent calls served (per process)",
    )
    flag(
        "--max-queued-rpcs",
        _LIMITS.max_queued_rpcs,
        type=int,
        help="calls waiting for a free worker; more get RESOURCE_EXHAUSTED (default "
        f"{_LIMITS.max_queued_rpcs})",
    )
    flag(
        "--processes",
        Supervision().processes,
        type=int,
        help="store processes sharing the port with SO_REUSEPORT, under one parent that restarts "
        f"them (0: one per usable core, at most {AUTO_MAX_PROCESSES}, with Redis; 1 with memory, "
        "which cannot be shared)",
    )
    flag("--log-level", "INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def check_session_space(backend: str, sessions: str | None, processes: int) -> None:
    """Sessions in this process's memory cannot be shared by several store processes."""
    in_memory = sessions == "memory" or (not sessions and backend == "memory")
    if in_memory and processes > 1:
        raise ValueError(
            f"--session-backend memory keeps sessions in one process, but --processes is "
            f"{processes}: give --session-backend a Redis URL, or run one process"
        )


def run(args: argparse.Namespace) -> int:
    from services.store.backends import CLUSTER_SCHEMES, check_backend_spec
    from services.store.processes import process_count

    check_backend_spec(args.backend)  # a clear error before any heavy import
    if args.session_backend:
        check_backend_spec(args.session_backend)
    processes = process_count(args.processes, args.backend)
    check_session_space(args.backend, args.session_backend, processes)
    if args.backend.startswith(CLUSTER_SCHEMES):  # here, not in each store process
        from services.store.backends.redis_cluster import ClusterUrl

        ClusterUrl.parse(args.backend)
    from services.store.malloc import tune_malloc

    tune_malloc()  # before gRPC starts its threads (and their malloc arenas)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from services.auth import ServerTls, store_tokens
    from services.grpc_server import run_until_signal
    from services.store.server import StoreConfig, StoreServer
    from services.store.service import StoreLimits

    config = StoreConfig(
        backend=args.backend,
        host=args.host,
        port=args.port,
        ttl_s=args.ttl or None,
        limits=StoreLimits(
            max_block_bytes=args.max_block_bytes,
            max_keys=args.max_keys,
            chunk_bytes=args.chunk_bytes,
            max_inflight_bytes=args.max_inflight_bytes,
            max_call_s=args.max_call_seconds,
            idle_s=args.idle_seconds,
            max_queued_rpcs=args.max_queued_rpcs,
        ),
        max_memory_bytes=args.max_memory_bytes,
        session_backend=args.session_backend or None,
        session_memory_bytes=args.session_memory_bytes,
        redis_password=args.redis_password,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        max_workers=args.max_workers,
        auth=store_tokens(args.store_auth_token, args.store_auth_token_file),
        tls=ServerTls.from_files(args.tls_cert_file, args.tls_key_file),
        data_port=args.data_port,
        data_max_connections=args.data_max_connections,
    )
    if processes > 1:
        from services.store.processes import StoreSupervisor, serve_supervised

        serve_supervised(StoreSupervisor(config, processes, log_level=args.log_level))
        logging.getLogger(__name__).info("KVStore stopped")
        return 0
    server = StoreServer(config)
    server.start()
    run_until_signal(server.stop)
    logging.getLogger(__name__).info("KVStore stopped")
    return 0
