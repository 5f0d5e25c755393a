"""Prefix hashing: the key of a block is a chained SHA-256 over every token before and in it.

`h0 = SHA256(canonical namespace)`; `h_i = SHA256(h_{i-1} || tokens of block i as little-endian
uint32)`. The namespace (format version, model fingerprint, codec spec, block size, tenant salt)
seeds the chain, so a block computed for another model, codec or tenant can never share a key.
Only `hashlib` and `struct` are involved: the same tokens hash the same in every process and on
every machine, with no dependence on PYTHONHASHSEED. The byte layout is pinned in
docs/block-format.md and by golden values in tests/workers/kv/test_hashing.py.

This module imports no torch, so the gateway can hash prompts without loading a model stack.
"""

import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from kvpool.errors import InvalidArgument

FORMAT_VERSION = 1

# The codec specs a namespace (and so a stored block) may name. They are hashed into every key,
# so they live with the namespace; `workers.kv.codec` implements exactly these (a test checks it).
CODEC_NAMES: tuple[str, ...] = (
    "fp16", "bf16", "int8", "fp8", "int4", "int4-kivi", "int4-g64", "fp32"
)  # fmt: skip
# A codec whose layout changed under the same spec is hashed as "spec@revision", so blocks of
# the old layout (still in a store) never share a key with the new: `int4` moved its scales and
# zero points from float16 to float8 (revision 2); the old layout is `int4-kivi`.
CODEC_REVISIONS: dict[str, int] = {"int4": 2}


def hashed_codec(spec: str) -> str:
    """The codec's spelling in the namespace bytes: the spec, with "@revision" after a change."""
    revision = CODEC_REVISIONS.get(spec, 1)
    return spec if revision == 1 else f"{spec}@{revision}"


BlockHash = NewType("BlockHash", bytes)
"""A 32-byte SHA-256 digest naming one block and, through the chain, its whole prefix."""

HASH_BYTES = 32
BLOCK_KEY_PREFIX = "kvpool:blk:"
_NAMESPACE_TAG = b"kvpool.namespace\x00"  # domain separation from the token chain
_WINDOW_TAG = b"window\x00"
_UINT32_MAX = 2**32 - 1
_MAX_TEXT_BYTES = 1024  # a fingerprint or tenant longer than this is a caller mistake
_TENANT_SALT_TAG = b"kvpool-tenant-salt\x00"  # HMAC input domain: never another message's bytes


def _check_uint32(name: str, value: object, minimum: int) -> int:
    if type(value) is not int or not minimum <= value <= _UINT32_MAX:
        raise InvalidArgument(
            f"Namespace.{name} must be an int in [{minimum}, 2**32), got {value!r}"
        )
    return value


def _check_text(name: str, value: object, allow_empty: bool) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"Namespace.{name} must be a str, got {type(value).__name__}")
    encoded = value.encode("utf-8")
    if (not encoded and not allow_empty) or len(encoded) > _MAX_TEXT_BYTES:
        raise InvalidArgument(
            f"Namespace.{name} must be {'' if allow_empty else 'non-empty and '}"
            f"at most {_MAX_TEXT_BYTES} UTF-8 bytes, got {len(encoded)}"
        )
    return encoded


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything besides the tokens that decides whether a stored block may be reused."""

    model_fingerprint: str
    codec: str
    block_tokens: int = 64
    tenant: str = ""  # tenant salt; "" is the default tenant
    format_version: int = FORMAT_VERSION
    # (max_cache_tokens, sink_tokens) for blocks computed after a windowed session's first
    # eviction (workers.window): their K and V depend on the window, not only on the tokens.
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _check_text("model_fingerprint", self.model_fingerprint, allow_empty=False)
        _check_text("tenant", self.tenant, allow_empty=True)
        if self.codec not in CODEC_NAMES:
            raise InvalidArgument(
                f"Namespace.codec must be one of {', '.join(CODEC_NAMES)}; got {self.codec!r}"
            )
        _check_uint32("block_tokens", self.block_tokens, minimum=1)
        # Any version may be *named* (so the hash of a future layout differs); decoding a value
        # still refuses versions this build does not read.
        _check_uint32("format_version", self.format_version, minimum=1)
        if self.window is not None:
            if not isinstance(self.window, tuple) or len(self.window) != 2:
                raise InvalidArgument(
                    f"Namespace.window must be (max_cache_tokens, sink_tokens), got {self.window!r}"
                )
            _check_uint32("window[0] (max_cache_tokens)", self.window[0], minimum=1)
            _check_uint32("window[1] (sink_tokens)", self.window[1], minimum=0)

    def canonical_bytes(self) -> bytes:
        """The exact bytes hashed into h0 (layout in docs/block-format.md, "Namespace")."""
        fields = [
            struct.pack("<I", self.format_version),
            _length_prefixed(self.model_fingerprint),
            _length_prefixed(hashed_codec(self.codec)),
            struct.pack("<I", self.block_tokens),
            _length_prefixed(self.tenant),
        ]
        if self.window is not None:  # absent for plain blocks, so their keys never changed
            fields.append(_WINDOW_TAG + struct.pack("<II", *self.window))
        return _NAMESPACE_TAG + b"".join(fields)

    def root(self) -> BlockHash:
        """h0, the parent of the first block."""
        return BlockHash(hashlib.sha256(self.canonical_bytes()).digest())


MIN_SECRET_BYTES = 16


def check_namespace_secret(secret: object) -> bytes:
    """A namespace secret: bytes, at least MIN_SECRET_BYTES long."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        shown = len(secret) if isinstance(secret, bytes) else type(secret).__name__
        raise ValueError(
            f"the namespace secret must be at least {MIN_SECRET_BYTES} bytes, got {shown} "
            "(make one with: openssl rand -hex 32)"
        )
    return secret


def new_namespace_secret() -> bytes:
    """A fresh random namespace secret (64 hex characters, as `openssl rand -hex 32` makes)."""
    return secrets.token_hex(32).encode()


def tenant_salt(tenant: str, secret: bytes) -> str:
    """The `Namespace.tenant` salt of a tenant: HMAC-SHA-256 of its name under the deployment's
    namespace secret (docs/block-format.md, "Tenant salt").

    With the tenant's plain name as the salt, anyone who could reach the store computed a
    victim's keys: `Lookup` told whether a prompt had been sent, and a block could be planted
    under them (the checksum is not a MAC). Under a secret the store never sees, keys cannot be
    computed without it. There is no salt without a secret: no salt equals or contains a
    tenant's name. A new secret is a cold cache, never a wrong one: every key changes at once.
    """
    mac = hmac.new(
        check_namespace_secret(secret), _TENANT_SALT_TAG + tenant.encode("utf-8"), hashlib.sha256
    )
    return "hmac-sha256:" + mac.hexdigest()


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<I", len(encoded)) + encoded


def as_block_hash(value: bytes) -> BlockHash:
    """Check that `value` (say, from a request) is a 32-byte digest and type it as a BlockHash."""
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        length = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise InvalidArgument(f"a block hash is {HASH_BYTES} bytes, got {length}")
    return BlockHash(value)


def chain_hashes(
    namespace: Namespace, token_ids: Sequence[int], parent: BlockHash | None = None
) -> list[BlockHash]:
    """One hash per full block of `token_ids`; the partial tail block gets none.

    `parent` continues an earlier chain (the hash of the block just before `token_ids[0]`);
    without it the chain starts at `namespace.root()`. `token_ids` must then start on a block
    boundary of the whole sequence, or the hashes will not match a fresh chain.
    """
    size = namespace.block_tokens
    previous = namespace.root() if parent is None else as_block_hash(parent)
    full = len(token_ids) // size
    try:
        packed = struct.pack(f"<{full * size}I", *token_ids[: full * size])
    except struct.error as exc:
        raise InvalidArgument(f"token ids must be ints in [0, 2**32): {exc}") from None
    hashes: list[BlockHash] = []
    step = 4 * size
    for start in range(0, len(packed), step):
        digest = hashlib.sha256(previous)
        digest.update(packed[start : start + step])
        previous = BlockHash(digest.digest())
        hashes.append(previous)
    return hashes


def block_key(block_hash: BlockHash) -> str:
    """The store key of a block: the one place it is built (`kvpool:blk:<64 hex digits>`)."""
    return BLOCK_KEY_PREFIX + as_block_hash(block_hash).hex()
