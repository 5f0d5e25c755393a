"""What `kv_connector_extra_config` may say to kvpool's vLLM connector, checked once at start.

    {"store": "HOST:PORT", "codec": "int8", "auth_token": "...", "tenant": "team-a"}

are the names another team's script may rely on; the rest have defaults. Secrets may come from
the environment instead (KVPOOL_STORE_AUTH_TOKEN, KVPOOL_NAMESPACE_SECRET), so they stay out of
command lines. No vLLM or torch import: the checks are unit-tested alone.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kvpool.errors import InvalidArgument
from workers.api import PLAN_MODES
from workers.kv.hashing import CODEC_NAMES, check_namespace_secret

RAW = "raw"  # the engine's own dtype, exactly: fp32, fp16 or bf16 by the KV cache's dtype
RAW_CODECS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
LOAD_ERROR_POLICIES = ("recompute", "fail")
_FREE = {"store", "auth_token", "namespace_secret"}  # checked where they are used


def _positive_int(value: object) -> bool:
    return type(value) is int and value >= 1


# Each checked key: (its default, whether a value is allowed, what is allowed, said as
# "kvpool connector: KEY must be ALLOWED, got VALUE").
_CHECKS: dict[str, tuple[object, Callable[[object], bool], str]] = {
    "codec": (
        "int8",
        lambda v: v == RAW or v in CODEC_NAMES,
        f"{RAW} or one of {', '.join(CODEC_NAMES)}",
    ),
    "tenant": (None, lambda v: v is None or (isinstance(v, str) and bool(v)), "a non-empty string"),
    "block_tokens": (None, lambda v: v is None or _positive_int(v), "a positive int"),
    "timeout_s": (
        2.0,
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 60,
        "in (0, 60]",
    ),
    "plan": ("auto", lambda v: v in PLAN_MODES, f"one of {', '.join(PLAN_MODES)}"),
    "on_load_error": (
        "recompute",
        lambda v: v in LOAD_ERROR_POLICIES,
        f"one of {', '.join(LOAD_ERROR_POLICIES)}",
    ),
    "max_pending_blocks": (512, _positive_int, "a positive int"),
    "metrics_port": (
        None,
        lambda v: v is None or (type(v) is int and 1 <= v <= 65535),
        "an int in [1, 65535] (leave it out for no metrics server of kvpool's own)",
    ),
    "metrics_host": (
        "127.0.0.1",
        lambda v: isinstance(v, str) and bool(v),
        "a host name or address to listen on (127.0.0.1, 0.0.0.0, ...)",
    ),
    "save_decode": (True, lambda v: type(v) is bool, "true or false"),
}


def _checked(extra: Mapping[str, object], name: str) -> object:
    default, allowed, says = _CHECKS[name]
    value = extra.get(name, default)
    if not allowed(value):
        raise InvalidArgument(f"kvpool connector: {name} must be {says}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    store: str
    codec: str = "int8"
    auth_token: str | None = None
    tenant: str | None = None  # every request's tenant, unless the request has a cache_salt
    namespace_secret: bytes | None = None  # salts tenants (HMAC); required when tenants are used
    block_tokens: int | None = None  # kvpool's block; None: vLLM's block size
    timeout_s: float = 2.0  # of each store call: a later answer is a miss
    plan: str = "auto"
    on_load_error: str = "recompute"
    max_pending_blocks: int = 512  # blocks waiting to be written; beyond, saves are dropped
    metrics_port: int | None = None  # kvpool's own /metrics, from the scheduler's process; off
    metrics_host: str = "127.0.0.1"  # where metrics_port listens: loopback unless asked
    # Save the blocks that generated tokens complete too, not only the prompt's: a
    # conversation's next turn (its history plus a new message) then finds its answer cached.
    save_decode: bool = True

    @classmethod
    def from_extra(
        cls, extra: Mapping[str, object], env: Mapping[str, str] = os.environ
    ) -> "ConnectorSettings":
        unknown = sorted(set(extra) - set(_CHECKS) - _FREE)
        if unknown:
            raise InvalidArgument(
                f"kvpool connector: unknown kv_connector_extra_config keys {unknown}; "
                f"allowed: {sorted(set(_CHECKS) | _FREE)}"
            )
        store = extra.get("store")
        if not isinstance(store, str) or ":" not in store:
            raise InvalidArgument(
                'kvpool connector: kv_connector_extra_config needs "store": "HOST:PORT" of a '
                f"`kvpool store serve`, got {store!r}"
            )
        values = {name: _checked(extra, name) for name in _CHECKS}
        secret = extra.get("namespace_secret") or env.get("KVPOOL_NAMESPACE_SECRET")
        if values["tenant"] is not None and not secret:
            raise InvalidArgument(
                "kvpool connector: a tenant needs a namespace secret to salt its keys "
                '("namespace_secret" or env KVPOOL_NAMESPACE_SECRET; make one with: '
                "openssl rand -hex 32)"
            )
        if isinstance(secret, str):
            secret = secret.encode()
        token = extra.get("auth_token") or env.get("KVPOOL_STORE_AUTH_TOKEN") or None
        return cls(
            store=store,
            auth_token=token,
            namespace_secret=check_namespace_secret(secret) if secret else None,
            **{**values, "timeout_s": float(values["timeout_s"])},
        )

    def codec_for(self, kv_dtype: str) -> str:
        """The block codec for an engine whose KV cache is `kv_dtype` ("float32", ...)."""
        if self.codec != RAW:
            return self.codec
        if kv_dtype not in RAW_CODECS:
            raise InvalidArgument(
                f"kvpool connector: codec raw has no spec for a {kv_dtype} KV cache"
            )
        return RAW_CODECS[kv_dtype]
