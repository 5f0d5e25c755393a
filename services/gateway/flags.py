"""The gateway's settings flags: one row per flag, each naming the settings field it sets.

A flag's default is its field's (services/gateway/settings.py), and its help ends with it, so
neither is written twice; `services.gateway.cli` adds the rows to its parser and builds the
settings back from them. A test fails when a settings field has neither a row nor a line in
NOT_FLAGS saying why not.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.gateway.settings import GatewaySettings
from services.store.cli import parse_size
from workers.api import ENGINES, PLAN_MODES, VLLM_CPU_KV_CACHE_BYTES, WorkerConfig

FIELD_DEFAULT: Any = object()  # a SettingFlag's default: the setting's own
MAX_BATCH = WorkerConfig().max_batch  # a worker's batch bound, by default


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
    SettingFlag(
        "--engine",
        "pool.worker.engine",
        "what runs prefill and decode in each worker: transformers (kvpool's own loop) or vllm "
        "(one vLLM engine per worker, in `make vllm`'s venv, sharing prompts through the store "
        'with kvpool\'s connector; docs/vllm.md, "vLLM as the engine")',
        choices=ENGINES,
    ),
    SettingFlag(
        "--vllm-python",
        "pool.worker.vllm_python",
        "with --engine vllm: the python of a venv holding vllm and kvpool (default: "
        ".venv-vllm beside this checkout, as `make vllm` builds it)",
    ),
    SettingFlag(
        "--kv-cache-bytes",
        "pool.worker.kv_cache_bytes",
        "with --engine vllm: each worker's vLLM KV cache (0: vLLM's own sizing on a GPU, "
        f"{VLLM_CPU_KV_CACHE_BYTES >> 20}MiB on CPU)",
        parse_size,
    ),
    SettingFlag("--model", "pool.worker.model", "smollm2-135m, tiny-random, a HF id or a path"),
    SettingFlag(
        "--device", "pool.worker.device", "worker device (default: cuda when it sees a GPU)"
    ),
    SettingFlag(
        "--codec",
        "pool.worker.codec",
        "block codec: fp16, bf16, int8, fp8, int4, int4-kivi, int4-g64",
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
        "--max-batch",
        "pool.worker.max_batch",
        "sequences a worker decodes together, one forward pass per step: more raise its "
        "throughput and each stream's time per token",
        int,
    ),
    SettingFlag(
        "--max-batch-tokens",
        "pool.worker.max_batch_tokens",
        "tokens one batch step may feed: one per decoding sequence, the rest for newcomers' "
        "prefill chunks; more shorten a newcomer's time to first token and stall the running "
        "streams longer (must exceed --max-batch)",
        int,
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
        "pool.route_load_penalty_tokens",
        "routing: a worker with a full batch (--max-requests-per-worker in flight) costs this "
        "many cached prefix tokens, each request in it a share",
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
    SettingFlag(
        "--max-concurrent-rpcs",
        "max_concurrent_rpcs",
        "threads each front (gRPC, HTTP) steps generations in: a generation holds one while it "
        "waits for its next token, a call waiting on its client none",
        int,
    ),
    # Per-tenant limits on calls (docs/operations.md, "Limits").
    SettingFlag(
        "--max-calls-per-tenant",
        "max_calls_per_tenant",
        "calls one tenant (its peer address with auth off) may have open, gRPC and HTTP "
        "together; more get RESOURCE_EXHAUSTED (0: no limit)",
        int,
    ),
    SettingFlag(
        "--request-timeout",
        "request_timeout_s",
        "seconds a gRPC call may take to send its request message before DEADLINE_EXCEEDED "
        "(0: no limit)",
        float,
    ),
    SettingFlag(
        "--idle-timeout",
        "idle_timeout_s",
        "seconds a stream may wait on its client (a response not read) before it is cancelled, "
        "its generation stopped on its worker (0: never)",
        float,
    ),
    SettingFlag(
        "--http-header-timeout",
        "http_header_timeout_s",
        "HTTP API: seconds a connection has to send a request's complete headers, from its "
        "start or the end of the last response; then 408 and closed (0: no limit)",
        float,
    ),
    SettingFlag(
        "--http-keepalive-timeout",
        "http_keepalive_s",
        "HTTP API: seconds an idle connection is kept open between requests",
        float,
    ),
    SettingFlag(
        "--max-connections-per-peer",
        "max_connections_per_peer",
        "HTTP API: connections one peer address may hold; more get 503 and are closed "
        "(behind a proxy every client is the proxy: 0 turns it off)",
        int,
    ),
    SettingFlag(
        "--max-http-connections",
        "max_http_connections",
        "HTTP API: connections every peer together may hold (0: no limit)",
        int,
    ),
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
        "pool.max_requests_per_worker",
        "requests one worker runs at once: its batch's admission bound, at most --max-batch; "
        "more wait at the gateway's queue (0: --max-batch)",
        int,
    ),
    SettingFlag(
        "--max-requests-per-tenant",
        "gateway.max_requests_per_tenant",
        "requests one tenant may run on workers or queue for one at once; more wait behind "
        "its own, then get RESOURCE_EXHAUSTED (0: with a token file of several tenants, the "
        "pool's slots less a quarter, so another always finds one; else no limit)",
        int,
    ),
    SettingFlag(
        "--max-queued-requests",
        "pool.max_queued_requests",
        "requests that may wait for a worker; more get RESOURCE_EXHAUSTED",
        int,
    ),
    SettingFlag(
        "--queue-timeout",
        "pool.queue_timeout_s",
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
    SettingFlag(
        "--metrics-host",
        "metrics_host",
        "address /metrics listens on, apart from --host: its series name tenants, so keep it "
        "off the clients' network (0.0.0.0 in containers, behind a NetworkPolicy)",
    ),
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
    "pool.worker.namespace_secret": "--namespace-secret(-file); kvpool serve keeps one in its "
    "state folder",
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


def build_settings(cls: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """`cls` with the fields `values` names (dotted paths), nested records built alike."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if path in values:
            kwargs[f.name] = values[path]
        elif dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = build_settings(f.default_factory, values, path + ".")
    return cls(**kwargs)
