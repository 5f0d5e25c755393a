"""`kvpool store serve` as a real subprocess: env settings, SIGTERM, bad backends."""

import os
import signal
import subprocess
import sys

import pytest
from grpc_health.v1 import health_pb2

from kvpool.errors import Unauthenticated, Unavailable
from services.auth import channel_credentials, client_token
from services.store.client import StoreClient
from tests.services.store.test_service import _health
from tests.support.tls import self_signed

pytestmark = pytest.mark.integration


def _kvpool(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kvpool.cli", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_serve_reads_env_and_exits_zero_on_sigterm(free_port, redis_server):
    port = free_port()
    # Settings through the environment (the flags' equivalents); the URL never in argv.
    env = {"KVPOOL_PORT": str(port), "KVPOOL_BACKEND": redis_server, "KVPOOL_GRACE": "2"}
    proc = _kvpool("store", "serve", env=env)
    try:
        with StoreClient(f"127.0.0.1:{port}", timeout_s=2) as client:
            client.wait_ready(30)
            assert client.put_many([("kvpool:sess:a", b"1")]) == 1
            assert client.stats().backend == redis_server
        assert _health(f"127.0.0.1:{port}", "") == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "SIGTERM" in stderr  # it logged why it stopped


@pytest.mark.parametrize(
    "backend", ["memcached://127.0.0.1:11211", "127.0.0.1:6379", "redis:/nohost"]
)
def test_unknown_backend_is_a_clear_error_without_traceback(backend):
    proc = _kvpool("store", "serve", "--backend", backend, "--port", "0")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "Traceback" not in stderr
    assert "unknown backend" in stderr
    assert "'memory' or a URL starting with redis://, rediss://, unix://" in stderr


def test_bad_size_is_a_usage_error():
    proc = _kvpool("store", "serve", "--max-block-bytes", "12XB")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "is not a size" in stderr and "Traceback" not in stderr


def test_parse_size_units():
    from services.store.cli import parse_size

    assert parse_size("4096") == 4096
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("1MiB") == parse_size("1m") == 1 << 20
    assert parse_size("2GiB") == 2 << 30


def test_serve_with_a_token_file_and_tls(free_port, tmp_path):
    cert, key = self_signed(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("# the store's internal token\nstore-token-0123456789\n")
    port = free_port()
    env = {
        "KVPOOL_PORT": str(port),
        "KVPOOL_GRACE": "1",
        "KVPOOL_STORE_AUTH_TOKEN_FILE": str(tokens),
        "KVPOOL_TLS_CERT_FILE": str(cert),
        "KVPOOL_TLS_KEY_FILE": str(key),
    }
    proc = _kvpool("store", "serve", env=env)
    target = f"127.0.0.1:{port}"
    tls = channel_credentials(cert.read_bytes())
    try:
        with StoreClient(target, timeout_s=2, credentials=tls) as anonymous:
            anonymous.wait_ready(30)
            with pytest.raises(Unauthenticated, match="missing bearer token"):
                anonymous.lookup(["kvpool:sess:a"])
        token = client_token(None, str(tokens))
        with StoreClient(target, timeout_s=2, credentials=tls, auth_token=token) as client:
            assert client.put_many([("kvpool:sess:a", b"1")]) == 1
            assert client.get_many(["kvpool:sess:a"]) == {"kvpool:sess:a": b"1"}
        plaintext = StoreClient(target, timeout_s=1, retries=0, auth_token=token)
        with plaintext, pytest.raises(Unavailable):  # the TLS port does not speak plaintext
            plaintext.lookup(["kvpool:sess:a"])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "store-token-0123456789" not in stderr


def test_the_store_never_accepts_the_gateways_tokens(free_port):
    """Issue 14, item 5: a tenant's token (KVPOOL_AUTH_TOKEN, as compose and Helm gave every
    process) must not open the store; only the internal service token does."""
    tenant, internal = "tenant-token-aaaaaaaaaaaa", "internal-token-bbbbbbbbbbbb"
    port = free_port()
    env = {"KVPOOL_PORT": str(port), "KVPOOL_GRACE": "1", "KVPOOL_AUTH_TOKEN": tenant}
    env["KVPOOL_STORE_AUTH_TOKEN"] = internal
    proc = _kvpool("store", "serve", env=env)
    try:
        with StoreClient(f"127.0.0.1:{port}", timeout_s=2, auth_token=tenant) as as_tenant:
            as_tenant.wait_ready(30)
            with pytest.raises(Unauthenticated):
                as_tenant.lookup(["kvpool:sess:a"])
        with StoreClient(f"127.0.0.1:{port}", timeout_s=2, auth_token=internal) as service:
            assert service.put_many([("kvpool:sess:a", b"1")]) == 1
    finally:
        proc.kill()
        proc.communicate()
    # Only the gateway's token set: refused, rather than serving without auth.
    env = {"KVPOOL_PORT": str(free_port()), "KVPOOL_AUTH_TOKEN": tenant}
    env["KVPOOL_STORE_AUTH_TOKEN"] = ""
    proc = _kvpool("store", "serve", env=env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "KVPOOL_STORE_AUTH_TOKEN" in stderr and tenant not in stderr
