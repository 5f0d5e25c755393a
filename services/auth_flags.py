"""The auth and TLS flags of every command, written once (docs/gateway.md, "Authentication and
tenants"; docs/store.md, "Security").

The same flag means the same thing everywhere, and each reads its `KVPOOL_` variable:

- a server (`kvpool store serve`, `kvpool gateway serve`, `kvpool serve`) requires tokens and
  serves TLS: `add_server_flags`;
- the store requires its own internal token and serves TLS: `add_store_server_flags`;
- a gateway reaching its store presents a token and may trust a CA: `add_store_client_flags`;
- `kvpool generate --target` presents a token to the gateway: `add_client_flags`.

Light on purpose (argparse only): the parsers are built before any command runs.
"""

import argparse

from kvpool.config import env_default


def _flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, default=env_default(name, None), help=help)


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    """Tokens callers must present, each with its tenant, and the server's TLS identity."""
    _flag(
        parser,
        "--auth-token-file",
        "require a bearer token from this file: lines of 'TOKEN [TENANT]', # comments",
    )
    _flag(
        parser,
        "--auth-token",
        "require this bearer token too (default tenant); prefer env KVPOOL_AUTH_TOKEN",
    )
    _flag(parser, "--tls-cert-file", "serve TLS with this PEM certificate chain")
    _flag(parser, "--tls-key-file", "the PEM private key of --tls-cert-file")


def add_store_server_flags(parser: argparse.ArgumentParser) -> None:
    """The store's own: the internal service token it requires, and its TLS identity.

    The store takes its token from --store-auth-token(-file), never from --auth-token(-file):
    those are the gateway's, and a token a gateway accepts from its clients would let any
    tenant read, overwrite and delete every tenant's blocks (docs/store.md, "Security").
    """
    _flag(
        parser,
        "--store-auth-token-file",
        "require the internal service token in this file (its first token; the same file the "
        "gateway and workers read)",
    )
    _flag(
        parser,
        "--store-auth-token",
        "require this internal service token; prefer env KVPOOL_STORE_AUTH_TOKEN. Never a "
        "token the gateway accepts",
    )
    _flag(
        parser, "--tls-cert-file", "serve TLS with this PEM certificate chain (with --tls-key-file)"
    )
    _flag(parser, "--tls-key-file", "the PEM private key of --tls-cert-file")


def add_store_client_flags(parser: argparse.ArgumentParser, *, tls: bool = True) -> None:
    """How a gateway (and its workers) reach the store: a token, and a CA to trust for TLS."""
    _flag(
        parser,
        "--store-auth-token-file",
        "file holding the store's internal service token (its first token); never one of this "
        "gateway's own tokens",
    )
    _flag(
        parser,
        "--store-auth-token",
        "the store's internal service token; prefer env KVPOOL_STORE_AUTH_TOKEN (kvpool serve "
        "generates one when absent)",
    )
    if tls:
        _flag(parser, "--tls-ca-file", "reach the store by TLS, trusting this PEM CA")


def add_namespace_secret_flags(parser: argparse.ArgumentParser) -> None:
    """The deployment's namespace secret, which keys each tenant's block hashes (gateway, serve)."""
    _flag(
        parser,
        "--namespace-secret-file",
        "file holding the deployment's namespace secret: it keys each tenant's block hashes, so "
        "no one without it can compute them (docs/block-format.md, 'Tenant salt')",
    )
    _flag(
        parser,
        "--namespace-secret",
        "the namespace secret itself; prefer env KVPOOL_NAMESPACE_SECRET or the file",
    )


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """What `kvpool generate --target` presents to a gateway, and how it checks the gateway."""
    _flag(
        parser,
        "--auth-token-file",
        "send the first token of this file as the bearer token (--target only)",
    )
    _flag(
        parser,
        "--auth-token",
        "send this bearer token; prefer env KVPOOL_AUTH_TOKEN (--target only)",
    )
    _flag(parser, "--tls-ca-file", "reach the gateway by TLS, trusting this PEM CA (--target only)")
    _flag(
        parser,
        "--tls-server-name",
        "the name the gateway's certificate must carry, when --target is another address "
        "(a port-forward to 127.0.0.1, say)",
    )
