"""Prefix hashing: pinned bytes, stability across processes, namespace isolation."""

import dataclasses
import hashlib
import hmac
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.errors import InvalidArgument
from workers.kv.hashing import (
    CODEC_NAMES,
    FORMAT_VERSION,
    BlockHash,
    Namespace,
    as_block_hash,
    block_key,
    chain_hashes,
    hashed_codec,
)

REPO = Path(__file__).resolve().parents[3]
NS = Namespace(model_fingerprint="sha256:0123abcd", codec="int8", block_tokens=4)

# Pinned: if one of these changes, every stored block becomes unreachable. Bump FORMAT_VERSION
# and docs/block-format.md instead of editing them.
GOLDEN_NS_BYTES = (
    "6b76706f6f6c2e6e616d65737061636500"  # "kvpool.namespace\0"
    "01000000"  # format version 1
    "0f000000"
    "7368613235363a3031323361626364"  # len 15, "sha256:0123abcd"
    "04000000"
    "696e7438"  # len 4, "int8"
    "04000000"  # block_tokens 4
    "00000000"  # len 0, tenant ""
)
GOLDEN_ROOT = "23c457225dda8c11bcb0057c4438eff3b7cc9a88a13891b33b7b4d32eb1f546d"
GOLDEN_CHAIN = [
    "5fd1f84b55d8544c4b4049fb6dcfda6556839724c2d1ca348c4e34d1bbd1e17d",
    "a12c79cb090eaf39a0fdd0e5e8c22cdfa719f7a60f2361fe228b99fbe35b5062",
]
# int4 is hashed as "int4@2" since its scales moved to float8 (CODEC_REVISIONS).
GOLDEN_TENANT_CHAIN = [
    "bd80b04a38761b6456bf8b8bd7cdae70031f620d9ffa8ce115450408b34dd6c8",
    "fd305cd915974538a7286e91ed1b627926a892172b962b4775018ff3accedb08",
]


def test_golden_namespace_bytes_and_chain() -> None:
    assert FORMAT_VERSION == 1
    assert NS.canonical_bytes().hex() == GOLDEN_NS_BYTES
    assert NS.root().hex() == GOLDEN_ROOT
    assert [h.hex() for h in chain_hashes(NS, range(10))] == GOLDEN_CHAIN
    tenant = Namespace("sha256:0123abcd", "int4", block_tokens=64, tenant="acme")
    tokens = [1] * 128 + [2**32 - 1] * 3
    assert [h.hex() for h in chain_hashes(tenant, tokens)] == GOLDEN_TENANT_CHAIN


def test_a_codec_whose_layout_changed_shares_no_key_with_its_old_blocks() -> None:
    """Blocks of int4's float16 layout (hashed as plain "int4", still in stores after an
    upgrade) and of today's int4 never share a key; the old layout lives on as int4-kivi."""
    assert hashed_codec("int4") == "int4@2" and hashed_codec("int8") == "int8"
    tokens = list(range(16))
    now = chain_hashes(Namespace("fp", "int4", block_tokens=4), tokens)
    before = Namespace("fp", "int8", block_tokens=4)
    old_bytes = before.canonical_bytes().replace(b"\x04\x00\x00\x00int8", b"\x04\x00\x00\x00int4")
    old_root = hashlib.sha256(old_bytes).digest()
    h = old_root
    old = []
    for i in range(0, 16, 4):
        h = hashlib.sha256(h + struct.pack("<4I", *tokens[i : i + 4])).digest()
        old.append(h)
    assert not set(now) & set(old)
    kivi = chain_hashes(Namespace("fp", "int4-kivi", block_tokens=4), tokens)
    assert not set(kivi) & set(now) and not set(kivi) & set(old)


def test_chain_is_the_documented_construction() -> None:
    """h0 = SHA256(namespace bytes); h_i = SHA256(h_{i-1} || uint32le tokens), by hand."""
    h0 = hashlib.sha256(bytes.fromhex(GOLDEN_NS_BYTES)).digest()
    h1 = hashlib.sha256(h0 + struct.pack("<4I", 0, 1, 2, 3)).digest()
    h2 = hashlib.sha256(h1 + struct.pack("<4I", 4, 5, 6, 7)).digest()
    assert chain_hashes(NS, list(range(8))) == [h1, h2]


def test_same_hash_in_a_subprocess_with_another_hash_seed() -> None:
    code = (
        "from workers.kv.hashing import Namespace, chain_hashes\n"
        "ns = Namespace(model_fingerprint='sha256:0123abcd', codec='int8', block_tokens=4)\n"
        "print(','.join(h.hex() for h in chain_hashes(ns, range(10))))\n"
    )
    hashes = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        hashes.add(out.stdout.strip())
    assert hashes == {",".join(GOLDEN_CHAIN)}


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": "sha256:0123abce"},
        {"codec": "int4"},
        {"block_tokens": 5},
        {"tenant": "acme"},
        {"format_version": 2},
    ],
)
def test_every_namespace_field_changes_every_hash(change: dict[str, object]) -> None:
    tokens = list(range(40))
    base = chain_hashes(NS, tokens)
    other = chain_hashes(dataclasses.replace(NS, **change), tokens)
    assert min(len(base), len(other)) >= 8
    assert not set(base) & set(other)


def test_field_boundaries_cannot_collide() -> None:
    """Length prefixes keep ("ab", "c") and ("a", "bc") apart."""
    a = Namespace("fp", "int8", tenant="x")
    b = Namespace("fp", "int8", tenant="")
    c = Namespace("fpx", "int8", tenant="")
    assert len({a.root(), b.root(), c.root()}) == 3


def test_partial_tail_block_gets_no_hash() -> None:
    assert chain_hashes(NS, [1, 2, 3]) == []
    assert len(chain_hashes(NS, range(4))) == 1
    assert chain_hashes(NS, range(7)) == chain_hashes(NS, range(4))


def test_each_hash_depends_on_the_whole_prefix() -> None:
    tokens = list(range(12))
    changed = [99, *tokens[1:]]
    assert not set(chain_hashes(NS, tokens)) & set(chain_hashes(NS, changed))


def test_parent_continues_a_chain() -> None:
    tokens = list(range(16))
    full = chain_hashes(NS, tokens)
    assert chain_hashes(NS, tokens[8:], parent=full[1]) == full[2:]


def test_token_ids_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="2\\*\\*32"):
        chain_hashes(NS, [0, 1, 2, 2**32])
    with pytest.raises(InvalidArgument):
        chain_hashes(NS, [0, 1, -1, 3])
    assert chain_hashes(NS, [0, 1, -1]) == []  # the tail is never read


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_fingerprint": ""},
        {"model_fingerprint": "x" * 1025},
        {"codec": "int3"},
        {"block_tokens": 0},
        {"block_tokens": True},
        {"block_tokens": 64.0},
        {"tenant": None},
        {"format_version": 0},
    ],
)
def test_namespace_rejects_bad_fields(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"model_fingerprint": "fp", "codec": "int8", **kwargs}
    with pytest.raises(InvalidArgument):
        Namespace(**fields)  # type: ignore[arg-type]


def test_unknown_codec_message_names_the_allowed_specs() -> None:
    with pytest.raises(InvalidArgument) as info:
        Namespace("fp", "int3")
    assert all(name in str(info.value) for name in CODEC_NAMES)


def test_block_key() -> None:
    h = BlockHash(bytes(range(32)))
    assert block_key(h) == "kvpool:blk:" + bytes(range(32)).hex()
    with pytest.raises(InvalidArgument):
        block_key(BlockHash(b"short"))
    with pytest.raises(InvalidArgument):
        as_block_hash(bytearray(32))  # type: ignore[arg-type]


GOLDEN_ACME_SALT = "hmac-sha256:624060d6e599b7630cf46d07ae86a07725d1e60276936a8ffcbad10712f0f7df"


def test_tenant_salt_is_a_keyed_hash_pinned_by_a_golden_value():
    """Issue 14, item 6: the salt was the tenant's name, so anyone computed a tenant's keys."""
    from workers.kv.hashing import tenant_salt

    secret = b"deployment-secret-0123456789abcdef"
    salt = tenant_salt("acme", secret)
    assert (
        salt
        == "hmac-sha256:"
        + hmac.new(secret, b"kvpool-tenant-salt\x00acme", hashlib.sha256).hexdigest()
    )
    assert salt == GOLDEN_ACME_SALT
    assert tenant_salt("acme", b"another-secret-0123456789abcdef") != salt
    assert tenant_salt("", secret) not in ("", salt)  # the default tenant is keyed too
    for missing in (None, b"", b"too-short"):  # issue 23: no salt without a secret
        with pytest.raises(ValueError, match="at least 16 bytes"):
            tenant_salt("acme", missing)  # type: ignore[arg-type]
    plain = chain_hashes(Namespace("fp", "int8", block_tokens=4, tenant="acme"), range(8))
    keyed = chain_hashes(Namespace("fp", "int8", block_tokens=4, tenant=salt), range(8))
    assert not set(plain) & set(keyed)
