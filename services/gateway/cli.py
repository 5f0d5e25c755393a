"""`kvpool gateway serve`: the Inference gateway and its Ray worker actors, until SIGTERM/SIGINT.

It joins the Ray cluster at RAY_ADDRESS when set (starting a local one otherwise) and reaches the
KVStore at `--store`, which every worker must be able to reach too. Every flag `--some-flag` can
also be set as `KVPOOL_SOME_FLAG`; the flag wins. `kvpool serve` shares these flags.
"""

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvpool.config import env_default
from services.auth_flags import (
    add_namespace_secret_flags,
    add_server_flags,
    add_store_client_flags,
)
from services.gateway.settings import GatewaySettings
from services.store.cli import parse_size
from workers.api import PLAN_MODES, ActorResources

FIELD_DEFAULT: Any = object()  # a SettingFlag's default: the setting's own
THREADS = ActorResources().max_concurrency  # a worker actor's threads for requests

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SettingFlag:
    """A flag that sets one field of `GatewaySettings` (a dotted path, e.g. `pool.worker.codec`).

    Its default is that field's default (`default` only where the command's differs on purpose),
    and its help ends with it, so neither is written twice. `gateway_settings` copies every row.
    """

    name: str
    setting: str
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = FIELD_DEFAULT
    to_setting: Callable[[Any], Any] = lambda value: value
    choices: tuple[str, ...] | None = None


def _off_when_zero(value: Any) -> Any:
    return value or None


# One row per settings flag; a new setting gets a row here (or a line in NOT_FLAGS, with why).
SETTINGS_FLAGS: tuple[SettingFlag, ...] = (
    SettingFlag(
        "--host",
        "host",
        "address the gateway listens on (0.0.0.0 serves the network: turn auth on first)",
    ),
    SettingFlag("--port", "port", "gateway gRPC port (0 picks a free one)", int),
    SettingFlag(
        "--http-port",
        "http_port",
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port, "
        "next to gRPC (0: off)",
        int,
        default=0,  # the setting's None; 0 is a free port there, off here
        to_setting=_off_when_zero,
    ),
    SettingFlag("--workers", "pool.workers", "worker actors to start", int),
    SettingFlag("--model", "pool.worker.model", "smollm2-135m, tiny-random, a HF id or a path"),
    SettingFlag(
        "--device", "pool.worker.device", "worker device (default: cuda when it sees a GPU)"
    ),
    SettingFlag(
        "--codec", "pool.worker.codec", "block codec: fp16, bf16, int8, fp8, int4, int4-g64"
    ),
    SettingFlag("--block-tokens", "pool.worker.block_tokens", "tokens per stored block", int),
    SettingFlag(
        "--l1-bytes", "pool.worker.l1_bytes", "per-worker L1 of decoded blocks", parse_size
    ),
    SettingFlag(
        "--node-tier-bytes",
        "pool.node_tier_bytes",
        "per-node tier (L2) of encoded blocks in Ray's object store, shared by the node's "
        "workers and outliving them (0: none; docs/hitpath.md)",
        parse_size,
    ),
    SettingFlag(
        "--fetch-plan",
        "pool.worker.fetch_plan",
        "how a worker uses a cached prefix: auto picks fetch, recompute or both at once from "
        "live measurements; fetch or recompute forces one (docs/hitpath.md)",
        choices=PLAN_MODES,
    ),
    SettingFlag(
        "--write-queue-blocks",
        "pool.worker.write_queue_blocks",
        "blocks a worker may hold for write-behind before it drops new ones",
        int,
    ),
    SettingFlag(
        "--block-ttl",
        "pool.worker.block_ttl_s",
        "TTL in seconds of stored blocks (0: the store's)",
        int,
        default=0,  # the setting's None: the store's default TTL
        to_setting=_off_when_zero,
    ),
    SettingFlag(
        "--session-ttl", "session_ttl_s", "seconds a session lives after its last turn", int
    ),
    SettingFlag(
        "--route-load-penalty-tokens",
        "route_load_penalty_tokens",
        "routing: one request in flight costs this many cached prefix tokens",
        int,
    ),
    SettingFlag(
        "--max-failovers",
        "gateway.max_failovers",
        "times one stream may move to another worker",
        int,
    ),
    SettingFlag(
        "--token-timeout",
        "gateway.token_timeout_s",
        "seconds a worker may stay silent, before it starts a request or between two tokens, "
        "before it is replaced",
        float,
    ),
    SettingFlag(
        "--prefill-timeout",
        "gateway.prefill_timeout_s",
        "seconds from a worker starting a request to its first token; past it the request "
        "fails with RESOURCE_EXHAUSTED and is not retried elsewhere",
        float,
    ),
    SettingFlag("--max-concurrent-rpcs", "max_concurrent_rpcs", "gRPC calls served at once", int),
    # Limits (docs/gateway.md, "Limits").
    SettingFlag(
        "--max-prompt-tokens",
        "gateway.max_prompt_tokens",
        "longest prompt, session history included, even with a bounded cache "
        "(0: the model's context)",
        int,
    ),
    SettingFlag(
        "--max-new-tokens",
        "gateway.max_new_tokens",
        "largest max_new_tokens a request may ask for (0: no limit)",
        int,
    ),
    SettingFlag(
        "--max-stop-strings", "gateway.max_stop_strings", "stop strings one request may give", int
    ),
    SettingFlag(
        "--max-stop-chars", "gateway.max_stop_chars", "longest stop string, in characters", int
    ),
    SettingFlag("--max-request-bytes", "max_request_bytes", "largest request message", parse_size),
    SettingFlag(
        "--max-requests-per-worker",
        "max_requests_per_worker",
        f"requests one worker runs at once, at most its {THREADS} threads; more wait at the "
        f"gateway (0: {THREADS})",
        int,
    ),
    SettingFlag(
        "--max-queued-requests",
        "max_queued_requests",
        "requests that may wait for a worker; more get RESOURCE_EXHAUSTED",
        int,
    ),
    SettingFlag(
        "--queue-timeout",
        "queue_timeout_s",
        "seconds a request waits for a worker before RESOURCE_EXHAUSTED",
        float,
    ),
    SettingFlag(
        "--max-sessions",
        "gateway.max_sessions",
        "live sessions this gateway keeps (0: no limit)",
        int,
    ),
    SettingFlag(
        "--max-sessions-per-tenant",
        "gateway.max_sessions_per_tenant",
        "live sessions one tenant may hold, so one cannot lock the others out (0: no limit but "
        "--max-sessions)",
        int,
    ),
    # Bounded sessions (docs/gateway.md, "Bounded sessions"): requests may override both.
    SettingFlag(
        "--max-cache-tokens",
        "gateway.max_cache_tokens",
        "bound each request's KV cache: keep --sink-tokens plus the most recent tokens "
        "(0: unbounded)",
        int,
    ),
    SettingFlag(
        "--sink-tokens", "gateway.sink_tokens", "first tokens a bounded cache always keeps", int
    ),
    SettingFlag("--metrics-port", "metrics_port", "Prometheus /metrics port (0: off)", int),
    SettingFlag("--grace", "grace_s", "seconds in-flight streams get on shutdown", float),
)

# Fields no SettingFlag sets: filled by `gateway_settings` from other flags, or left at their
# default on purpose. A test fails when a field of GatewaySettings is in neither place.
NOT_FLAGS: dict[str, str] = {
    "store_target": "--store, or the stack's own store (kvpool serve)",
    "auth": "--auth-token, --auth-token-file",
    "tls": "--tls-cert-file, --tls-key-file",
    "store_auth_token": "--store-auth-token(-file), else the gateway's own token",
    "store_tls_ca": "--tls-ca-file",
    "store_timeout_s": "the default: a deadline on every store call",
    "pool.resources.num_gpus": "--worker-gpus (default: 1 when the cluster has GPUs)",
    "pool.resources.num_cpus": "--worker-cpus (0 for a GPU worker)",
    "pool.resources.max_concurrency": "the default: generations sharing one model",
    "pool.start_timeout_s": "the default: a model load in a fresh process",
    "pool.replace_dead": "the default: dead workers are replaced",
    "pool.worker.node_tier": "--node-tier-bytes above 0",
    "pool.worker.namespace_secret": "--namespace-secret(-file)",
    "gateway.namespace_secret": "--namespace-secret(-file)",
    "pool.replace_attempts": "the default: tries to start one replacement",
    "pool.replace_backoff_s": "the default: first wait between those tries (doubling)",
    "pool.worker.store_target": "GatewayServer hands the store's address to the workers",
    "pool.worker.store_timeout_s": "GatewayServer hands store_timeout_s to the workers",
    "pool.worker.store_auth_token": "GatewayServer hands the store's token to the workers",
    "pool.worker.store_tls_ca": "GatewayServer hands the store's CA to the workers",
    "pool.worker.retain_freed_memory": "the default (workers.actor.retain_freed_memory)",
}


def setting_fields(cls: type = GatewaySettings, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of `cls` as a dotted path, with its default (MISSING when it has none)."""
    found: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            found |= setting_fields(factory, path + ".")  # type: ignore[arg-type]
        elif factory is not dataclasses.MISSING:
            found[path] = factory()
        else:
            found[path] = f.default
    return found


def format_size(size: int) -> str:
    """1073741824 -> '1GiB': the largest unit that divides `size`."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def add_gateway_flags(parser: argparse.ArgumentParser, *, store_tls: bool = True) -> None:
    """Flags of the gateway and its workers (shared with `kvpool serve`, whose store is local)."""
    defaults = setting_fields()

    def flag(name: str, default: object, **kwargs: Any) -> None:
        parser.add_argument(name, default=env_default(name, default), **kwargs)

    for row in SETTINGS_FLAGS:
        default = defaults[row.setting] if row.default is FIELD_DEFAULT else row.default
        if row.type is parse_size:
            default = format_size(default)  # shown as a size; argparse parses it like the flag
        shown = "" if default in (None, 0) else f" (default {default})"  # 0 is explained
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
    if args.max_requests_per_worker > THREADS:
        raise ValueError(
            f"--max-requests-per-worker must be at most a worker's {THREADS} threads, "
            f"got {args.max_requests_per_worker}"
        )
    for name in ("token_timeout", "prefill_timeout"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.queue_timeout < 0:
        raise ValueError(f"--queue-timeout must be >= 0, got {args.queue_timeout}")
    if args.max_stop_chars < 1:
        raise ValueError(f"--max-stop-chars must be >= 1, got {args.max_stop_chars}")
    if args.max_cache_tokens:
        from workers.kv.bounds import CacheWindow

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
) -> GatewaySettings:
    """The settings the flags ask for: every SettingFlag row, then the fields other flags make.

    `store_auth_token`: the store's token when the caller made the store (kvpool serve).
    """
    from services.auth import ServerTls, read_pem, server_tokens

    values = {
        row.setting: row.to_setting(getattr(args, row.name.lstrip("-").replace("-", "_")))
        for row in SETTINGS_FLAGS
    }
    secret = namespace_secret(args)
    if worker_gpus > 0:
        resources = ActorResources(num_gpus=worker_gpus, num_cpus=0.0)
    else:
        resources = ActorResources(num_gpus=0.0, num_cpus=args.worker_cpus)
    values |= {
        "store_target": store_target,
        "pool.worker.store_target": store_target,
        "pool.resources": resources,
        "pool.worker.node_tier": values["pool.node_tier_bytes"] > 0,
        "pool.worker.namespace_secret": secret,
        "gateway.namespace_secret": secret,
        "auth": server_tokens(args.auth_token, args.auth_token_file),
        "tls": ServerTls.from_files(args.tls_cert_file, args.tls_key_file),
        "store_auth_token": store_auth_token or store_token(args),
        "store_tls_ca": read_pem(getattr(args, "tls_ca_file", None), "TLS CA certificate"),
    }
    return _build(GatewaySettings, values)


def _build(cls: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """`cls` with the fields `values` names (dotted paths), nested records built alike."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if path in values:
            kwargs[f.name] = values[path]
        elif dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = _build(f.default_factory, values, path + ".")
    return cls(**kwargs)


def run(args: argparse.Namespace) -> int:
    if not args.store:
        raise ValueError("--store HOST:PORT is required (or set KVPOOL_STORE)")
    check_args(args)
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
