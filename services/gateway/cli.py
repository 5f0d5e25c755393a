"""`kvpool gateway serve`: the Inference gateway and its Ray worker actors, until SIGTERM/SIGINT.

It joins the Ray cluster at RAY_ADDRESS when set (starting a local one otherwise) and reaches the
KVStore at `--store`, which every worker must be able to reach too. Every flag `--some-flag` can
also be set as `KVPOOL_SOME_FLAG`; the flag wins. `kvpool serve` shares these flags.
"""

import argparse
import logging
import os
from typing import Any

from kvpool.config import env_default
from services.auth_flags import (
    add_namespace_secret_flags,
    add_server_flags,
    add_store_client_flags,
)
from services.gateway.flags import (
    FIELD_DEFAULT,
    SETTINGS_FLAGS,
    build_settings,
    setting_fields,
)
from services.gateway.settings import GatewaySettings
from services.store.cli import format_size, parse_size
from workers.api import ActorResources

log = logging.getLogger(__name__)


def add_gateway_flags(parser: argparse.ArgumentParser, *, store_tls: bool = True) -> None:
    """Flags of the gateway and its workers (shared with `kvpool serve`, whose store is local)."""
    defaults = setting_fields()

    def flag(name: str, default: object, **kwargs: Any) -> None:
        parser.add_argument(name, default=env_default(name, default), **kwargs)

    for row in SETTINGS_FLAGS:
        default = defaults[row.setting] if row.default is FIELD_DEFAULT else row.default
        if row.type is parse_size:
            default = format_size(default)  # shown as a size; argparse parses it like the flag
        # None, 0 and "" are explained in the help ("0: ...", "default: ...")
        shown = "" if default in (None, 0, "", "0", "0B") else f" (default {default})"
        flag(row.name, default, type=row.type, choices=row.choices, help=row.help + shown)
    flag(
        "--worker-gpus",
        None,
        type=float,
        help="GPUs per worker: 1 on a GPU box, 0 for CPU workers (default: 1 when the Ray "
        "cluster has GPUs, else 0)",
    )
    cpus = ActorResources().num_cpus
    flag("--worker-cpus", cpus, type=float, help=f"CPU slots per CPU worker (default {cpus})")
    add_server_flags(parser)  # docs/gateway.md, "Authentication and tenants"
    add_store_client_flags(parser, tls=store_tls)
    add_namespace_secret_flags(parser)  # docs/block-format.md, "Tenant salt"
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=os.environ.get("KVPOOL_INSECURE_NO_AUTH", "") not in ("", "0", "false"),
        help="serve a --host beyond loopback with auth off, which is refused otherwise: anyone "
        "who reaches the port then generates as any tenant and reads any session",
    )
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
    if not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be between 0 (off) and 65535, got {args.http_port}")
    if args.worker_gpus is not None and args.worker_gpus < 0:
        raise ValueError(f"--worker-gpus must be >= 0, got {args.worker_gpus}")
    for name in (
        "max_prompt_tokens",
        "max_new_tokens",
        "max_requests_per_worker",
        "max_requests_per_tenant",
        "max_queued_requests",
        "max_stop_strings",
        "max_sessions",
        "max_sessions_per_tenant",
        "max_cache_tokens",
        "sink_tokens",
    ):
        if getattr(args, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 0 (0: no limit), got {getattr(args, name)}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_batch_tokens <= args.max_batch:
        raise ValueError(
            f"--max-batch-tokens must exceed --max-batch={args.max_batch} (each decoding "
            f"sequence takes one token of a step, prefill the rest), got {args.max_batch_tokens}"
        )
    if args.max_requests_per_worker > args.max_batch:
        raise ValueError(
            f"--max-requests-per-worker must be at most --max-batch={args.max_batch} (0: that), "
            f"got {args.max_requests_per_worker}"
        )
    for name in ("token_timeout", "prefill_timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.queue_timeout < 0:
        raise ValueError(f"--queue-timeout must be >= 0, got {args.queue_timeout}")
    if args.max_stop_chars < 1:
        raise ValueError(f"--max-stop-chars must be >= 1, got {args.max_stop_chars}")
    if args.engine == "vllm":
        check_vllm_args(args)
    if args.max_cache_tokens:
        from workers.kv.bounds import CacheWindow

        try:
            CacheWindow(args.max_cache_tokens, args.sink_tokens, args.block_tokens)
        except ValueError as exc:  # name the flags, not the fields
            raise ValueError(
                f"--max-cache-tokens/--sink-tokens: {exc}".replace("block_tokens", "--block-tokens")
            ) from None


VLLM_NO_STORE_TLS = (
    "--engine vllm: kvpool's vLLM connector reaches the store in plaintext only; a store behind "
    "TLS (--tls-ca-file, or kvpool serve's store with --tls-cert-file) is not supported with "
    "this engine yet"
)


def check_vllm_args(args: argparse.Namespace) -> None:
    """What --engine vllm cannot serve, refused at start (docs/vllm.md, "vLLM as the engine")."""
    if args.max_cache_tokens:
        raise ValueError(
            "--max-cache-tokens: the vllm engine does not bound a request's cache; serve bounded "
            "sessions with --engine transformers"
        )
    if args.block_tokens % 16:
        raise ValueError(
            f"--block-tokens {args.block_tokens}: with --engine vllm a block spans whole vLLM "
            "blocks, so it must be a multiple of 16"
        )
    if getattr(args, "tls_ca_file", None):
        raise ValueError(VLLM_NO_STORE_TLS)


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
    from workers.kv.hashing import check_namespace_secret

    return check_namespace_secret(text.strip().encode())


LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


def check_exposure(args: argparse.Namespace) -> None:
    """A gateway serving the network with auth off is refused, unless --insecure-no-auth says so:
    with auth off every caller names its tenant and reads any session."""
    from services.auth import server_tokens

    if args.host in LOOPBACK or server_tokens(args.auth_token, args.auth_token_file) is not None:
        return
    if args.insecure_no_auth:
        log.warning(
            "serving %s with auth off (--insecure-no-auth): anyone who reaches the gateway may "
            "generate as any tenant and read any session", args.host,
        )  # fmt: skip
        return
    raise ValueError(
        f"--host {args.host} serves the network but auth is off, so anyone who reaches it could "
        "generate as any tenant and read any session; give --auth-token-file FILE (or env "
        "KVPOOL_AUTH_TOKEN), or pass --insecure-no-auth to serve it without auth anyway"
    )


def check_namespace_secret_given(args: argparse.Namespace) -> None:
    """A stand-alone gateway that serves tenants refuses to start without a namespace secret.

    Its workers' keys are salted by it; a random one for this process alone would share nothing
    with the deployment's other gateways, or with this one after a restart, and a tenant's keys
    must never be computable from its name. With only default-tenant tokens, a random secret for
    this process is enough (`WorkerConfig`'s default), and a warning says what it costs.
    """
    from services.auth import server_tokens

    if namespace_secret(args) is not None:
        return
    auth = server_tokens(args.auth_token, args.auth_token_file)
    named = sorted({t for t in auth.tenants.values() if t}) if auth is not None else None
    if named is None or named:
        if named is None:
            who = "with auth off, every request names its own tenant"
        else:
            who = f"its token file names tenants: {', '.join(named[:3])}"
            who += ", ..." if named[3:] else ""
        raise ValueError(
            f"this gateway serves tenants ({who}) but has no namespace secret, which keys each "
            "tenant's block hashes so that no one can compute them from its name; give every "
            "gateway of the deployment the same one: --namespace-secret-file FILE or env "
            "KVPOOL_NAMESPACE_SECRET (make one with: openssl rand -hex 32)"
        )
    log.warning(
        "no namespace secret given (--namespace-secret-file): using a random one for this "
        "process, so its blocks are shared with no other gateway and not across a restart"
    )


def gateway_settings(
    args: argparse.Namespace,
    store_target: str,
    worker_gpus: float,
    store_auth_token: str | None = None,
    secret: bytes | None = None,
) -> GatewaySettings:
    """The settings the flags ask for: every SettingFlag row, then the fields other flags make.

    `store_auth_token`: the store's token when the caller made the store (kvpool serve).
    `secret`: the namespace secret when the caller keeps one (kvpool serve's state folder);
    --namespace-secret(-file) wins. Neither: a random one (`WorkerConfig`'s default).
    """
    from services.auth import ServerTls, read_pem, server_tokens

    values = {
        row.setting: row.to_setting(getattr(args, row.name.lstrip("-").replace("-", "_")))
        for row in SETTINGS_FLAGS
    }
    secret = namespace_secret(args) or secret
    if worker_gpus > 0:
        resources = ActorResources(num_gpus=worker_gpus, num_cpus=0.0)
    else:
        resources = ActorResources(num_gpus=0.0, num_cpus=args.worker_cpus)
    values |= {
        "store_target": store_target,
        "pool.worker.store_target": store_target,
        "pool.resources": resources,
        "pool.worker.node_tier": values["pool.node_tier_bytes"] > 0,
        "auth": server_tokens(args.auth_token, args.auth_token_file),
        "tls": ServerTls.from_files(args.tls_cert_file, args.tls_key_file),
        "store_auth_token": store_auth_token or store_token(args),
        "store_tls_ca": read_pem(getattr(args, "tls_ca_file", None), "TLS CA certificate"),
    }
    if secret is not None:
        values["pool.worker.namespace_secret"] = secret
    return build_settings(GatewaySettings, values)


def run(args: argparse.Namespace) -> int:
    if not args.store:
        raise ValueError("--store HOST:PORT is required (or set KVPOOL_STORE)")
    check_args(args)
    check_exposure(args)
    check_namespace_secret_given(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from services.grpc_server import run_until_signal
    from services.stack import Stack

    with Stack() as stack:
        cluster_gpus = stack.start_ray(args.workers, args.worker_cpus)
        gpus = args.worker_gpus if args.worker_gpus is not None else (1.0 if cluster_gpus else 0.0)
        gateway = stack.start_gateway(gateway_settings(args, args.store, gpus))
        log.info("gateway serving on %s:%d with %d workers", args.host, gateway.port, args.workers)
        run_until_signal(gateway.stop)
    return 0
