"""What `kv_connector_extra_config` may say to kvpool's vLLM connector, checked once at start.

    {"store": "HOST:PORT", "codec": "int8", "auth_token": "...", "tenant": "team-a"}

are the names another team's script may rely on; the rest have defaults. Secrets may come from
the environment instead (KVPOOL_STORE_AUTH_TOKEN, KVPOOL_NAMESPACE_SECRET), so they stay out of
command lines. No vLLM or torch import: the checks are unit-tested alone.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kvpool.errors import InvalidArgument
from workers.api import PLAN_MODES
from workers.kv.hashing import CODEC_NAMES, check_namespace_secret

RAW = "raw"  # the engine's own dtype, exactly: fp32, fp16 or bf16 by the KV cache's dtype
RAW_CODECS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
LOAD_ERROR_POLICIES = ("recompute", "fail")
_KNOWN = {
    "store", "codec", "auth_token", "tenant", "namespace_secret", "block_tokens", "timeout_s",
    "plan", "on_load_error", "max_pending_blocks", "metrics_port", "metrics_host", "save_decode",
}  # fmt: skip


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
        unknown = sorted(set(extra) - _KNOWN)
        if unknown:
            raise InvalidArgument(
                f"kvpool connector: unknown kv_connector_extra_config keys {unknown}; "
                f"allowed: {sorted(_KNOWN)}"
            )
        store = extra.get("store")
        if not isinstance(store, str) or ":" not in store:
            raise InvalidArgument(
                'kvpool connector: kv_connector_extra_config needs "store": "HOST:PORT" of a '
                f"`kvpool store serve`, got {store!r}"
            )
        codec = extra.get("codec", "int8")
        if codec != RAW and codec not in CODEC_NAMES:
            raise InvalidArgument(
                f"kvpool connector: codec must be {RAW} or one of {', '.join(CODEC_NAMES)}, "
                f"got {codec!r}"
            )
        secret = extra.get("namespace_secret") or env.get("KVPOOL_NAMESPACE_SECRET")
        tenant = extra.get("tenant")
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise InvalidArgument(
                f"kvpool connector: tenant must be a non-empty string, got {tenant!r}"
            )
        if tenant is not None and not secret:
            raise InvalidArgument(
                "kvpool connector: a tenant needs a namespace secret to salt its keys "
                '("namespace_secret" or env KVPOOL_NAMESPACE_SECRET; make one with: '
                "openssl rand -hex 32)"
            )
        block_tokens = extra.get("block_tokens")
        if block_tokens is not None and (type(block_tokens) is not int or block_tokens < 1):
            raise InvalidArgument(
                f"kvpool connector: block_tokens must be a positive int, got {block_tokens!r}"
            )
        timeout_s = extra.get("timeout_s", 2.0)
        if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 60:
            raise InvalidArgument(
                f"kvpool connector: timeout_s must be in (0, 60], got {timeout_s!r}"
            )
        plan = extra.get("plan", "auto")
        if plan not in PLAN_MODES:
            raise InvalidArgument(
                f"kvpool connector: plan must be one of {', '.join(PLAN_MODES)}, got {plan!r}"
            )
        policy = extra.get("on_load_error", "recompute")
        if policy not in LOAD_ERROR_POLICIES:
            raise InvalidArgument(
                "kvpool connector: on_load_error must be one of "
                f"{', '.join(LOAD_ERROR_POLICIES)}, got {policy!r}"
            )
        pending = extra.get("max_pending_blocks", 512)
        if type(pending) is not int or pending < 1:
            raise InvalidArgument(
                f"kvpool connector: max_pending_blocks must be a positive int, got {pending!r}"
            )
        metrics_port = extra.get("metrics_port")
        if metrics_port is not None and (
            type(metrics_port) is not int or not 1 <= metrics_port <= 65535
        ):
            raise InvalidArgument(
                "kvpool connector: metrics_port must be an int in [1, 65535] (leave it out for "
                f"no metrics server of kvpool's own), got {metrics_port!r}"
            )
        metrics_host = extra.get("metrics_host", "127.0.0.1")
        if not isinstance(metrics_host, str) or not metrics_host:
            raise InvalidArgument(
                "kvpool connector: metrics_host must be a host name or address to listen on "
                f"(127.0.0.1, 0.0.0.0, ...), got {metrics_host!r}"
            )
        save_decode = extra.get("save_decode", True)
        if type(save_decode) is not bool:
            raise InvalidArgument(
                f"kvpool connector: save_decode must be true or false, got {save_decode!r}"
            )
        if isinstance(secret, str):
            secret = secret.encode()
        token = extra.get("auth_token") or env.get("KVPOOL_STORE_AUTH_TOKEN") or None
        return cls(
            store=store, codec=codec, auth_token=token, tenant=tenant,
            namespace_secret=check_namespace_secret(secret) if secret else None,
            block_tokens=block_tokens, timeout_s=float(timeout_s), plan=plan,
            on_load_error=policy, max_pending_blocks=pending, metrics_port=metrics_port,
            metrics_host=metrics_host, save_decode=save_decode,
        )  # fmt: skip

    def codec_for(self, kv_dtype: str) -> str:
        """The block codec for an engine whose KV cache is `kv_dtype` ("float32", ...)."""
        if self.codec != RAW:
            return self.codec
        if kv_dtype not in RAW_CODECS:
            raise InvalidArgument(
                f"kvpool connector: codec raw has no spec for a {kv_dtype} KV cache"
            )
        return RAW_CODECS[kv_dtype]
