"""`kvpool serve`: the whole stack in one command, until SIGTERM or SIGINT.

It starts the KVStore in this process (the memory backend, or Redis with `--redis URL`), joins
the Ray cluster at RAY_ADDRESS or starts a local one, starts `--workers` worker actors and
serves the Inference gateway on `--port` (and the OpenAI-compatible HTTP API on `--http-port`,
when given). On a signal the gateway stops taking calls and lets open streams finish, the
workers flush their pending block writes, then the store stops.

Unless `--namespace-secret(-file)` gives one, the namespace secret that keys every tenant's block
hashes is generated on the first start and kept in `--state-dir` (a file of mode 0600, its path
logged at start), so a restart over the same Redis finds its blocks again (docs/security.md).
"""

import argparse
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from kvpool.config import env_default, state_dir
from services.gateway.cli import (
    VLLM_NO_STORE_TLS,
    add_gateway_flags,
    check_args,
    check_exposure,
    gateway_settings,
    namespace_secret,
    store_token,
)
from services.store.cli import check_session_space, parse_size
from services.store.processes import AUTO_MAX_PROCESSES, Supervision, process_count
from services.store.settings import StoreConfig

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
    port = StoreConfig().port
    flag("--store-port", port, type=int, help=f"the embedded KVStore's port (default {port})")
    data = StoreConfig().data_port
    flag(
        "--store-data-port",
        data,
        type=int,
        help="the embedded KVStore's data path port for Get and Lookup (docs/store.md, 'The data "
        f"path'; default {data}: a free one; -1: off; always off with TLS)",
    )
    flag(
        "--store-host",
        StoreConfig().host,
        help="address the embedded KVStore listens on (default 127.0.0.1; give this node's "
        "address or 0.0.0.0 when RAY_ADDRESS puts workers on other machines)",
    )
    # Twice the standalone store's: here the store shares its process with the gateway and is
    # the only tier of blocks shared across restarts of a worker.
    flag("--store-memory-bytes", "2GiB", type=parse_size, help="memory backend's byte bound")
    flag(
        "--store-processes",
        Supervision().processes,
        type=int,
        help="KVStore processes sharing --store-port, as `kvpool store serve --processes` (0: one "
        f"per usable core, at most {AUTO_MAX_PROCESSES}, with --redis; 1 with the memory backend)",
    )
    flag(
        "--session-backend",
        None,
        metavar="URL",
        help="keep session records in this Redis (run it with noeviction), apart from the "
        "blocks' --redis, whose LRU could evict them (default: an in-process space with the "
        "memory backend, the --redis otherwise)",
    )
    flag(
        "--state-dir",
        None,
        metavar="DIR",
        help="where the namespace secret is kept across restarts (default: $KVPOOL_STATE_DIR, "
        "else $XDG_STATE_HOME/kvpool, else ~/.local/state/kvpool)",
    )
    add_gateway_flags(parser)


SECRET_FILE = "namespace-secret"


def kept_secret(folder: Path) -> tuple[bytes, Path, bool]:
    """The namespace secret kept in `folder`, made on first use: (secret, its file, made now).

    The file is created with mode 0600 in a folder of mode 0700 and never rewritten; a file that
    others may read, or that holds no valid secret, is refused with what to do about it.
    """
    from workers.kv.hashing import check_namespace_secret, new_namespace_secret

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / SECRET_FILE
    made = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(new_namespace_secret() + b"\n")
        made = True
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"the namespace secret file {path} may be read by others (mode {mode:o}); "
            f"make it private: chmod 600 {path}"
        )
    try:
        return check_namespace_secret(path.read_bytes().strip()), path, made
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; delete it to make a new one (a cold cache)") from None


def deployment_secret(args: argparse.Namespace) -> bytes:
    """--namespace-secret(-file) when given, else the one kept in the state folder."""
    given = namespace_secret(args)
    if given is not None:
        return given
    folder = Path(args.state_dir).expanduser() if args.state_dir else state_dir()
    secret, path, made = kept_secret(folder)
    # Printed, whatever --log-level says: whoever runs this should know where the secret is.
    what = "made now" if made else "kept from an earlier start, so the cache carries over"
    print(f"kvpool serve: namespace secret in {path} ({what})", file=sys.stderr, flush=True)
    return secret


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
        data_port=args.store_data_port,
        max_memory_bytes=args.store_memory_bytes,
        session_backend=args.session_backend or None,
        redis_password=args.redis_password,
        auth=TokenTable({internal_token: ""}),
        tls=tls,
    )
    return config, ca


def run(args: argparse.Namespace) -> int:
    check_args(args)
    check_exposure(args)
    store_processes = process_count(args.store_processes, args.redis or "memory")
    check_session_space(args.redis or "memory", args.session_backend, store_processes)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from dataclasses import replace

    from services.grpc_server import run_until_signal
    from services.stack import Stack
    from services.store.backends import redact_url

    remote_workers = bool(os.environ.get("RAY_ADDRESS"))
    if remote_workers and args.store_host in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "RAY_ADDRESS is set but the embedded store listens on %s only: workers on other "
            "machines cannot reach it (give --store-host)", args.store_host
        )  # fmt: skip
    # The embedded store accepts just the internal token the gateway and workers present to it,
    # generated here unless given, and never one the gateway accepts from its clients.
    internal_token = store_token(args) or secrets.token_urlsafe(32)
    secret = deployment_secret(args)
    store_config, store_ca = embedded_store(args, internal_token)
    if args.engine == "vllm" and store_ca is not None:
        raise ValueError(VLLM_NO_STORE_TLS)
    with Stack() as stack:
        store_port = stack.start_store(
            store_config, processes=store_processes, log_level=args.log_level
        )
        cluster_gpus = stack.start_ray(args.workers, args.worker_cpus)
        gpus = args.worker_gpus if args.worker_gpus is not None else (1.0 if cluster_gpus else 0.0)
        settings = gateway_settings(args, stack.store_target, gpus, internal_token, secret)
        gateway = stack.start_gateway(replace(settings, store_tls_ca=store_ca))
        log.info(
            "kvpool serving on %s:%d: %d workers, store %s on port %d",
            args.host, gateway.port, args.workers, redact_url(store_config.backend), store_port,
        )  # fmt: skip
        run_until_signal(gateway.stop)
    return 0
