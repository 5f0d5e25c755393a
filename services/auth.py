"""Bearer tokens and TLS: the token file format, the server's check, and what clients send.

Token file (`--auth-token-file`), one token per line, blank lines are skipped, and a word that
starts with `#` starts a comment (a `#` inside a token is part of it). Tokens a server accepts are
at least 16 characters (`openssl rand -hex 32` makes 64):

    # token                                  tenant
    3f9c0e5b8f7d4c1aa6e2b0d9c8e7f6a5           acme
    b1d2c3e4f5a6978877665544332211ff           globex
    0c0ffee0c0ffee0c0ffee0c0ffee0c0f          # a bare token acts for the default tenant ""

A server accepts every token in its file and maps each to its tenant; `KVPOOL_AUTH_TOKEN` (or
`--auth-token`) adds one more token for the default tenant. A client sends the first token of its
file, so a file holding one bare token serves both ends. Tokens are compared in constant time,
against every accepted token, so timing tells neither a prefix of a token nor which one matched.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvpool.errors import InvalidArgument, Unauthenticated

AUTH_HEADER = "authorization"
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a gRPC metadata value may carry
TENANT = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


MIN_TOKEN_CHARS = 16


def check_token(token: str, where: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{where}: a token must be visible ASCII characters without spaces")
    return token


def check_accepted_token(token: str, where: str) -> str:
    """A token a server accepts: well formed and long enough not to be guessed."""
    check_token(token, where)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters, got {len(token)} "
            "(make one with: openssl rand -hex 32)"
        )
    return token


def check_tenant(tenant: str, where: str) -> str:
    if tenant and not TENANT.fullmatch(tenant):
        raise ValueError(
            f"{where}: tenant {tenant!r} must be 1-128 of letters, digits and . _ : @ -"
        )
    return tenant


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The tokens a server accepts, each with the tenant its caller acts for."""

    tenants: Mapping[str, str] = field(repr=False)  # token -> tenant ("" is the default tenant)

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("a token table needs at least one token")
        for token, tenant in self.tenants.items():
            check_token(token, "auth token")
            check_tenant(tenant, "auth token")

    def tenant_for(self, authorization: str | bytes | None) -> str | None:
        """The tenant of a `Bearer <token>` header value, or None when no token matches.

        The scheme is case-insensitive (RFC 9110: `bearer` and `BEARER` are `Bearer`), and
        spaces between it and the token are skipped.
        """
        if authorization is None:
            return None
        sent = authorization.encode() if isinstance(authorization, str) else authorization
        scheme, _, credentials = sent.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        credentials = credentials.lstrip(b" ")
        found: str | None = None
        for token, tenant in self.tenants.items():  # no early exit: every token costs the same
            if hmac.compare_digest(credentials, token.encode()):
                found = tenant
        return found

    @property
    def first_token(self) -> str:
        return next(iter(self.tenants))


def parse_token_file(text: str, source: str = "token file") -> TokenTable:
    """Parse the format in the module docstring; errors name the file and line."""
    tenants: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        # A comment starts at a word that starts with '#', not at any '#': a token may hold one,
        # and cutting it there accepted its prefix.
        parts = raw.split()
        for n, word in enumerate(parts):
            if word.startswith("#"):
                parts = parts[:n]
                break
        if not parts:
            continue
        where = f"{source} line {number}"
        if len(parts) > 2:
            raise ValueError(f"{where}: expected 'TOKEN' or 'TOKEN TENANT', got {len(parts)} words")
        token = check_accepted_token(parts[0], where)
        tenant = check_tenant(parts[1] if len(parts) == 2 else "", where)
        if token in tenants:
            raise ValueError(f"{where}: this token is listed twice")
        tenants[token] = tenant
    if not tenants:
        raise ValueError(f"{source}: no token in it")
    return TokenTable(tenants)


def load_token_file(path: str | Path) -> TokenTable:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the auth token file {path}: {exc.strerror}") from None
    return parse_token_file(text, str(path))


def server_tokens(token: str | None, token_file: str | None) -> TokenTable | None:
    """What a server accepts: the file's tokens plus `token` (default tenant); None: no auth."""
    tenants: dict[str, str] = {}
    if token_file:
        tenants.update(load_token_file(token_file).tenants)
    if token:
        tenants.setdefault(check_accepted_token(token.strip(), "KVPOOL_AUTH_TOKEN"), "")
    return TokenTable(tenants) if tenants else None


# What the store used to read. Set for a store (the gateway's own tokens, a tenant's token among
# them) they would now be ignored, silently turning auth off: refused instead.
_GATEWAY_TOKEN_ENV = ("KVPOOL_AUTH_TOKEN", "KVPOOL_AUTH_TOKEN_FILE")


def store_tokens(
    token: str | None, token_file: str | None, env: Mapping[str, str] | None = None
) -> TokenTable | None:
    """What a store accepts: the internal service token (the first of `token_file`, or `token`).

    Raises ValueError when only the gateway's variables are set: the store no longer accepts
    them, and starting without auth instead would be a silent downgrade.
    """
    internal = client_token(token, token_file)
    if internal is not None:
        return TokenTable({check_accepted_token(internal, "KVPOOL_STORE_AUTH_TOKEN"): ""})
    env = os.environ if env is None else env
    if any(env.get(name) for name in _GATEWAY_TOKEN_ENV):
        raise ValueError(
            "KVPOOL_AUTH_TOKEN / KVPOOL_AUTH_TOKEN_FILE are the gateway's tokens and the store "
            "no longer accepts them; give the store its own internal token with "
            "KVPOOL_STORE_AUTH_TOKEN (or --store-auth-token-file), the same one the gateway "
            "and workers present (docs/store.md, 'Security')"
        )
    return None


def client_token(token: str | None, token_file: str | None) -> str | None:
    """What a client sends: the file's first token, else `token`; None: no auth."""
    if token_file:
        return load_token_file(token_file).first_token
    return check_token(token.strip(), "KVPOOL_AUTH_TOKEN") if token else None


def caller_tenant(
    request_tenant: str,
    authorization: str | bytes | None,
    auth: TokenTable | None,
    field: str = "tenant",
) -> str:
    """The tenant a call acts for: the one rule, for the gRPC and the HTTP API alike.

    Without auth the request names its tenant in `field` ("" is the default tenant). With auth
    the token decides; a request that names another tenant is refused rather than silently
    re-labelled, so a client that mixes up its tokens hears about it.
    """
    check_tenant(request_tenant, "the request" if field == "tenant" else f"the request's {field}")
    if auth is None:
        return request_tenant
    tenant = auth.tenant_for(authorization)
    if tenant is None:  # the server lets no such call through; never fall back to a default
        raise Unauthenticated("bearer token not accepted")
    if request_tenant and request_tenant != tenant:
        raise InvalidArgument(
            f"the request names tenant {request_tenant!r} but its token acts for "
            f"{tenant or 'the default tenant'!r}; leave {field} empty when auth is on"
        )
    return tenant


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata a client attaches to every call."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else None


def request_authorization(metadata: Sequence[Any] | None) -> str | bytes | None:
    for item in metadata or ():
        if item[0] == AUTH_HEADER:
            return item[1]
    return None


# --- TLS -------------------------------------------------------------------------------------


def read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate chain and private key (PEM)."""

    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)

    @classmethod
    def from_files(cls, cert_file: str | None, key_file: str | None) -> ServerTls | None:
        if not cert_file and not key_file:
            return None
        if not (cert_file and key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together; give both or none")
        return cls(
            read_pem(cert_file, "TLS certificate") or b"", read_pem(key_file, "TLS key") or b""
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)])


def channel_credentials(ca_pem: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials that trust `ca_pem`; None (plaintext) when no CA is given."""
    return None if ca_pem is None else grpc.ssl_channel_credentials(root_certificates=ca_pem)
