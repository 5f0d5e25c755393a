"""Issue 14, item 7: `kvpool serve`'s embedded store listens on loopback unless asked, requires
its internal token, and serves TLS whenever the gateway does (a real store on loopback)."""

import pytest

from kvpool.cli import build_parser
from kvpool.commands.serve import embedded_store
from kvpool.errors import Unauthenticated, Unavailable
from services.auth import channel_credentials
from services.store.client import StoreClient
from services.store.server import StoreServer
from tests.support.tls import self_signed

pytestmark = pytest.mark.integration

TOKEN = "internal-token-0123456789abcdef"


def serve_args(*words: str):
    return build_parser().parse_args(["serve", "--store-port", "0", *words])


def test_loopback_even_when_workers_may_be_remote(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6380")
    config, ca = embedded_store(serve_args(), TOKEN)
    assert config.host == "127.0.0.1" and ca is None and config.tls is None
    assert config.auth is not None and config.auth.tenant_for(f"Bearer {TOKEN}") == ""
    asked, _ = embedded_store(serve_args("--store-host", "0.0.0.0"), TOKEN)
    assert asked.host == "0.0.0.0"


def test_the_data_path_is_on_unless_turned_off():
    on, _ = embedded_store(serve_args(), TOKEN)
    assert on.data_port == 0  # a free port, advertised through Stats
    off, _ = embedded_store(serve_args("--store-data-port", "-1"), TOKEN)
    assert off.data_port == -1
    for config, listening in ((on, True), (off, False)):
        server = StoreServer(config)
        server.start()
        try:
            assert (server.data_port is not None) == listening
        finally:
            server.stop(0)


def test_tls_when_the_gateway_has_tls(tmp_path):
    cert, key = self_signed(tmp_path)
    args = serve_args("--tls-cert-file", str(cert), "--tls-key-file", str(key))
    config, ca = embedded_store(args, TOKEN)
    assert ca == cert.read_bytes()
    server = StoreServer(config)
    server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        tls = channel_credentials(ca)
        with StoreClient(target, timeout_s=5, credentials=tls, auth_token=TOKEN) as client:
            assert client.put_many([("kvpool:sess:a", b"1")]) == 1
        anonymous = StoreClient(target, timeout_s=5, credentials=tls)
        with anonymous, pytest.raises(Unauthenticated):
            anonymous.lookup(["kvpool:sess:a"])
        plaintext = StoreClient(target, timeout_s=1, retries=0, auth_token=TOKEN)
        with plaintext, pytest.raises(Unavailable):
            plaintext.lookup(["kvpool:sess:a"])
    finally:
        server.stop(0)
