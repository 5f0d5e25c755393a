"""`kvpool serve`: the whole stack in one command, until SIGTERM or SIGINT.

It starts the KVStore in this process (the memory backend, or Redis with `--redis URL`), joins
the Ray cluster at RAY_ADDRESS or starts a local one, starts `--workers` worker actors and
serves the Inference gateway on `--port`. On a signal the gateway stops taking calls and lets
open streams finish, the workers flush their pending block writes, then the store stops.
"""

import argparse
import logging
import os
import secrets

from kvpool.config import env_default
from services.gateway.cli import (
    add_gateway_flags,
    check_args,
    gateway_settings,
    init_ray,
    store_token,
)
from services.store.cli import parse_size

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, default: object, **kwargs: object) -> None:
        parser.add_argument(name, default=env_default(name, default), **kwargs)  # type: ignore[arg-type]

    flag(
        "--redis",
        None,
        metavar="URL",
        help="keep blocks in this Redis (redis://, rediss://, unix://) instead of in memory",
    )
    flag(
        "--redis-password",
        None,
        help="Redis password when not in the --redis URL (prefer env KVPOOL_REDIS_PASSWORD)",
    )
    flag("--store-port", 50052, type=int, help="the embedded KVStore's port (default 50052)")
    flag(
        "--store-host",
        "127.0.0.1",
        help="address the embedded KVStore listens on (default 127.0.0.1; give this node's "
        "address or 0.0.0.0 when RAY_ADDRESS puts workers on other machines)",
    )
    flag("--store-memory-bytes", "2GiB", type=parse_size, help="memory backend's byte bound")
    add_gateway_flags(parser)


def embedded_store(args: argparse.Namespace, internal_token: str):  # -> (StoreConfig, CA PEM)
    """The embedded store's config, and the CA its clients trust (None: plaintext).

    It listens on loopback unless --store-host says otherwise, requires the internal token, and
    serves TLS with the gateway's certificate whenever the gateway has TLS: its clients then
    trust --tls-ca-file, or that certificate itself (a self-signed one).
    """
    from services.auth import ServerTls, TokenTable, read_pem
    from services.store.server import StoreConfig

    tls = ServerTls.from_files(args.tls_cert_file, args.tls_key_file)
    ca = None
    if tls is not None:
        ca = read_pem(args.tls_ca_file, "TLS CA certificate") or tls.cert_chain
    config = StoreConfig(
        backend=args.redis or "memory",
        host=args.store_host,
        port=args.store_port,
        max_memory_bytes=args.store_memory_bytes,
        redis_password=args.redis_password,
        auth=TokenTable({internal_token: ""}),
        tls=tls,
    )
    return config, ca


def run(args: argparse.Namespace) -> int:
    check_args(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from dataclasses import replace

    import ray

    from services.gateway.server import GatewayServer
    from services.grpc_server import run_until_signal
    from services.store.server import StoreServer

    remote_workers = bool(os.environ.get("RAY_ADDRESS"))
    loopback = args.store_host in ("127.0.0.1", "::1", "localhost")
    if remote_workers and loopback:
        log.warning(
            "RAY_ADDRESS is set but the embedded store listens on %s only: workers on other "
            "machines cannot reach it (give --store-host)", args.store_host
        )  # fmt: skip
    # The embedded store accepts just the internal token the gateway and workers present to it,
    # generated here unless given, and never one the gateway accepts from its clients.
    internal_token = store_token(args) or secrets.token_urlsafe(32)
    store_config, store_ca = embedded_store(args, internal_token)
    store = StoreServer(store_config)
    store_port = store.start()
    gateway = None
    try:
        cluster_gpus = init_ray(args.workers, args.worker_cpus)
        # Workers on other machines reach the store at this node's address, not loopback.
        advertised = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        gpus = args.worker_gpus if args.worker_gpus is not None else (1.0 if cluster_gpus else 0.0)
        settings = gateway_settings(args, f"{advertised}:{store_port}", gpus, internal_token)
        settings = replace(settings, store_tls_ca=store_ca)
        gateway = GatewayServer(settings)
        # One /metrics for the whole process: without this the embedded store's figures (its
        # backend being up, Redis evictions, calls by status code) were exported nowhere.
        gateway.metrics.registry.register(store.metrics.registry)
        port = gateway.start()
        log.info(
            "kvpool serving on %s:%d: %d workers, store %s on port %d",
            args.host, port, args.workers, store.backend_name, store_port,
        )  # fmt: skip
        run_until_signal(gateway.stop)
    finally:
        if gateway is not None:
            gateway.stop()
        if ray.is_initialized():
            ray.shutdown()
        store.stop()
    return 0
