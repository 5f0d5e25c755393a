"""`kvpool gateway serve`: the Inference gateway and its Ray worker actors, until SIGTERM/SIGINT.

It joins the Ray cluster at RAY_ADDRESS when set (starting a local one otherwise) and reaches the
KVStore at `--store`, which every worker must be able to reach too. Every flag `--some-flag` can
also be set as `KVPOOL_SOME_FLAG`; the flag wins. `kvpool serve` shares these flags.
"""

import argparse
import logging
import os

from kvpool.config import env_default
from services.store.cli import parse_size

log = logging.getLogger(__name__)


def add_gateway_flags(parser: argparse.ArgumentParser, *, store_tls: bool = True) -> None:
    """Flags of the gateway and its workers (shared with `kvpool serve`, whose store is local)."""

    def flag(name: str, default: object, **kwargs: object) -> None:
        parser.add_argument(name, default=env_default(name, default), **kwargs)  # type: ignore[arg-type]

    flag(
        "--host",
        "127.0.0.1",
        help="address the gateway listens on (default 127.0.0.1; 0.0.0.0 serves the network: "
        "turn auth on first)",
    )
    flag("--port", 50051, type=int, help="gateway gRPC port (0 picks a free one; default 50051)")
    flag("--workers", 1, type=int, help="worker actors to start (default 1)")
    flag(
        "--worker-gpus",
        None,
        type=float,
        help="GPUs per worker: 1 on a GPU box, 0 for CPU workers (default: 1 when the Ray "
        "cluster has GPUs, else 0)",
    )
    flag("--worker-cpus", 1.0, type=float, help="CPU slots per CPU worker (default 1)")
    flag("--model", "smollm2-135m", help="smollm2-135m (default), tiny-random, a HF id or a path")
    flag("--device", None, help="worker device (default: cuda when the worker sees a GPU)")
    flag("--codec", "int8", help="block codec: fp16, bf16, int8 (default), fp8, int4, int4-g64")
    flag("--block-tokens", 64, type=int, help="tokens per stored block (default 64)")
    flag("--l1-bytes", "1GiB", type=parse_size, help="per-worker L1 of decoded blocks (1GiB)")
    flag(
        "--write-queue-blocks",
        512,
        type=int,
        help="blocks a worker may hold for write-behind before it drops new ones (default 512)",
    )
    flag("--block-ttl", 0, type=int, help="TTL in seconds of stored blocks (0: the store's)")
    flag("--session-ttl", 86400, type=int, help="seconds a session lives after its last turn")
    flag(
        "--route-load-penalty-tokens",
        512,
        type=int,
        help="routing: one request in flight costs this many cached prefix tokens (default 512)",
    )
    flag("--max-failovers", 3, type=int, help="times one stream may move to another worker")
    flag(
        "--token-timeout",
        300.0,
        type=float,
        help="seconds without a token before a worker is replaced",
    )
    flag("--max-concurrent-rpcs", 64, type=int, help="gRPC calls served at once")
    # Limits (docs/gateway.md, "Limits"); 0 means no limit beyond the model's context.
    flag("--max-prompt-tokens", 0, type=int, help="longest prompt, session history included")
    flag("--max-new-tokens", 0, type=int, help="largest max_new_tokens a request may ask for")
    flag("--max-request-bytes", "4MiB", type=parse_size, help="largest request message (4MiB)")
    flag(
        "--max-requests-per-worker",
        0,
        type=int,
        help="requests one worker runs at once; more get RESOURCE_EXHAUSTED (0: no limit)",
    )
    flag("--max-sessions", 0, type=int, help="live sessions this gateway keeps (0: no limit)")
    flag(
        "--max-sessions-per-tenant",
        0,
        type=int,
        help="live sessions one tenant may hold, so one cannot lock the others out (0: no "
        "limit but --max-sessions)",
    )
    # Bounded sessions (docs/gateway.md, "Bounded sessions"): requests may override both.
    flag(
        "--max-cache-tokens",
        0,
        type=int,
        help="bound each request's KV cache: keep --sink-tokens plus the most recent tokens "
        "(0: unbounded)",
    )
    flag("--sink-tokens", 4, type=int, help="first tokens a bounded cache always keeps (4)")
    # Security (docs/gateway.md, "Authentication and tenants").
    parser.add_argument(
        "--auth-token-file",
        default=env_default("--auth-token-file", None),
        help="require a bearer token from this file: lines of 'TOKEN [TENANT]', # comments",
    )
    parser.add_argument(
        "--auth-token",
        default=env_default("--auth-token", None),
        help="require this bearer token too (default tenant); prefer env KVPOOL_AUTH_TOKEN",
    )
    parser.add_argument(
        "--store-auth-token-file",
        default=env_default("--store-auth-token-file", None),
        help="file holding the store's internal service token (its first token); never one of "
        "this gateway's own tokens",
    )
    parser.add_argument(
        "--store-auth-token",
        default=env_default("--store-auth-token", None),
        help="the store's internal service token; prefer env KVPOOL_STORE_AUTH_TOKEN (kvpool "
        "serve generates one when absent)",
    )
    parser.add_argument(
        "--namespace-secret-file",
        default=env_default("--namespace-secret-file", None),
        help="file holding the deployment's namespace secret: it keys each tenant's block "
        "hashes, so no one without it can compute them (docs/block-format.md, 'Tenant salt')",
    )
    parser.add_argument(
        "--namespace-secret",
        default=env_default("--namespace-secret", None),
        help="the namespace secret itself; prefer env KVPOOL_NAMESPACE_SECRET or the file",
    )
    flag("--tls-cert-file", None, help="serve TLS with this PEM certificate chain")
    flag("--tls-key-file", None, help="the PEM private key of --tls-cert-file")
    if store_tls:
        flag("--tls-ca-file", None, help="reach the store by TLS, trusting this PEM CA")
    flag("--metrics-port", 0, type=int, help="Prometheus /metrics port (0: off)")
    flag("--grace", 30.0, type=float, help="seconds in-flight streams get on shutdown")
    flag("--log-level", "INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=env_default("--store", None),
        metavar="HOST:PORT",
        help="the KVStore service, reachable from here and from every worker (env KVPOOL_STORE)",
    )
    add_gateway_flags(parser)


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for bad values before anything heavy starts."""
    from workers.kv.hashing import CODEC_NAMES

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.codec not in CODEC_NAMES:
        raise ValueError(f"--codec must be one of {', '.join(CODEC_NAMES)}, got {args.codec!r}")
    if args.block_tokens < 1:
        raise ValueError(f"--block-tokens must be >= 1, got {args.block_tokens}")
    if args.worker_gpus is not None and args.worker_gpus < 0:
        raise ValueError(f"--worker-gpus must be >= 0, got {args.worker_gpus}")
    for name in (
        "max_prompt_tokens",
        "max_new_tokens",
        "max_requests_per_worker",
        "max_sessions",
        "max_sessions_per_tenant",
        "max_cache_tokens",
        "sink_tokens",
    ):
        if getattr(args, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 0 (0: no limit), got {getattr(args, name)}")
    if args.max_cache_tokens:
        from workers.window import CacheWindow

        try:
            CacheWindow(args.max_cache_tokens, args.sink_tokens, args.block_tokens)
        except ValueError as exc:  # name the flags, not the fields
            raise ValueError(
                f"--max-cache-tokens/--sink-tokens: {exc}".replace("block_tokens", "--block-tokens")
            ) from None


def store_token(args: argparse.Namespace) -> str | None:
    """The internal service token the gateway and its workers present to the store.

    Only --store-auth-token(-file): never one of the gateway's own tokens, which its clients
    hold (a tenant with the store's token could read and overwrite every tenant's blocks).
    """
    from services.auth import client_token

    return client_token(args.store_auth_token, args.store_auth_token_file)


def namespace_secret(args: argparse.Namespace) -> bytes | None:
    """The secret that keys tenant salts (the file's content, else the value); None: none."""
    from pathlib import Path

    text = args.namespace_secret
    if args.namespace_secret_file:
        try:
            text = Path(args.namespace_secret_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(
                f"cannot read the namespace secret file {args.namespace_secret_file}: "
                f"{exc.strerror}"
            ) from None
    if not text or not text.strip():
        return None
    secret = text.strip().encode()
    if len(secret) < 16:
        raise ValueError(
            f"the namespace secret must be at least 16 bytes, got {len(secret)} "
            "(make one with: openssl rand -hex 32)"
        )
    return secret


def gateway_settings(
    args: argparse.Namespace,
    store_target: str,
    worker_gpus: float,
    store_auth_token: str | None = None,
):  # -> GatewaySettings
    from services.auth import ServerTls, read_pem, server_tokens
    from services.gateway.inference import GatewayConfig
    from services.gateway.pool import PoolConfig
    from services.gateway.server import GatewaySettings
    from workers.actor import ActorResources
    from workers.worker import WorkerConfig

    secret = namespace_secret(args)
    worker = WorkerConfig(
        model=args.model,
        device=args.device,
        codec=args.codec,
        block_tokens=args.block_tokens,
        store_target=store_target,
        l1_bytes=args.l1_bytes,
        write_queue_blocks=args.write_queue_blocks,
        block_ttl_s=args.block_ttl or None,
        namespace_secret=secret,
    )
    if worker_gpus > 0:
        resources = ActorResources(num_gpus=worker_gpus, num_cpus=0.0)
    else:
        resources = ActorResources(num_gpus=0.0, num_cpus=args.worker_cpus)
    return GatewaySettings(
        store_target=store_target,
        host=args.host,
        port=args.port,
        pool=PoolConfig(workers=args.workers, worker=worker, resources=resources),
        gateway=GatewayConfig(
            max_failovers=args.max_failovers,
            token_timeout_s=args.token_timeout,
            max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens,
            max_sessions=args.max_sessions,
            max_sessions_per_tenant=args.max_sessions_per_tenant,
            namespace_secret=secret,
            max_cache_tokens=args.max_cache_tokens,
            sink_tokens=args.sink_tokens,
        ),
        route_load_penalty_tokens=args.route_load_penalty_tokens,
        session_ttl_s=args.session_ttl,
        metrics_port=args.metrics_port,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_s=args.grace,
        auth=server_tokens(args.auth_token, args.auth_token_file),
        tls=ServerTls.from_files(args.tls_cert_file, args.tls_key_file),
        store_auth_token=store_auth_token or store_token(args),
        store_tls_ca=read_pem(getattr(args, "tls_ca_file", None), "TLS CA certificate"),
        max_request_bytes=args.max_request_bytes,
        max_requests_per_worker=args.max_requests_per_worker,
    )


def init_ray(workers: int, worker_cpus: float) -> float:
    """Join RAY_ADDRESS, or start a local cluster that fits the workers; returns cluster GPUs."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # Enough CPU slots for every worker even on a small box: they then share the cores
        # rather than wait forever for a slot.
        cpus = max(os.cpu_count() or 1, int(workers * worker_cpus + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return float(ray.cluster_resources().get("GPU", 0.0))


def run(args: argparse.Namespace) -> int:
    if not args.store:
        raise ValueError("--store HOST:PORT is required (or set KVPOOL_STORE)")
    check_args(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import ray

    from services.gateway.server import GatewayServer
    from services.grpc_server import run_until_signal

    cluster_gpus = init_ray(args.workers, args.worker_cpus)
    gpus = args.worker_gpus if args.worker_gpus is not None else (1.0 if cluster_gpus else 0.0)
    gateway = GatewayServer(gateway_settings(args, args.store, gpus))
    try:
        port = gateway.start()
        log.info("gateway serving on %s:%d with %d workers", args.host, port, args.workers)
        run_until_signal(gateway.stop)
    finally:
        gateway.stop()
        ray.shutdown()
    return 0
