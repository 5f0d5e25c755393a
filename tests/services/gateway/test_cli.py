"""`kvpool gateway serve` and `kvpool serve` flags for auth and limits, parsed (no servers)."""

import os
from dataclasses import replace

import pytest

from kvpool.cli import build_parser
from services.gateway.cli import check_args, gateway_settings, store_token
from services.gateway.flags import NOT_FLAGS, SETTINGS_FLAGS, setting_fields
from services.gateway.settings import GatewaySettings
from tests.support.tls import self_signed


def parse(*words: str):
    return build_parser().parse_args(["gateway", "serve", "--store", "s:1", *words])


def test_the_store_gets_its_own_token_never_one_the_gateway_accepts(tmp_path):
    """Issue 14, item 5: the gateway's tokens (a tenant's among them) never reach the store."""
    tenants = tmp_path / "tokens"
    tenants.write_text("tenant-token-aaaaaaaa acme\n")
    assert store_token(parse("--auth-token-file", str(tenants))) is None
    shared = parse("--auth-token-file", str(tenants), "--auth-token", "shared-token-bbbbbbbb")
    assert store_token(shared) is None
    own = parse("--auth-token", "shared-token-bbbbbbbb", "--store-auth-token", "store-cccccccc")
    assert store_token(own) == "store-cccccccc"
    assert store_token(parse()) is None
    reused = parse("--auth-token-file", str(tenants), "--store-auth-token", "tenant-token-aaaaaaaa")
    with pytest.raises(ValueError, match="must not be a token the gateway accepts"):
        gateway_settings(reused, "127.0.0.1:1", 0.0)


def test_limits_and_auth_reach_the_settings(tmp_path, monkeypatch):
    tenants = tmp_path / "tokens"
    tenants.write_text("tenant-token-aaaaaaaa acme\n")
    monkeypatch.setenv("KVPOOL_MAX_SESSIONS", "7")
    args = build_parser().parse_args(
        ["serve", "--auth-token-file", str(tenants), "--max-prompt-tokens", "100",
         "--max-new-tokens", "10", "--max-request-bytes", "64KiB", "--max-requests-per-worker", "2"]
    )  # fmt: skip
    check_args(args)
    settings = gateway_settings(args, "127.0.0.1:1", 0.0)
    assert settings.auth is not None
    assert settings.auth.tenant_for("Bearer tenant-token-aaaaaaaa") == "acme"
    assert settings.store_auth_token is None  # kvpool serve generates the embedded store's
    assert (settings.gateway.max_prompt_tokens, settings.gateway.max_new_tokens) == (100, 10)
    assert settings.gateway.max_sessions == 7
    assert (settings.max_request_bytes, settings.pool.max_requests_per_worker) == (64 << 10, 2)
    assert settings.pool.worker.store_auth_token is None  # GatewayServer hands it to the workers
    with pytest.raises(ValueError, match="--max-sessions must be >= 0"):
        check_args(build_parser().parse_args(["serve", "--max-sessions", "-1"]))


def test_serve_takes_the_redis_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVPOOL_REDIS_PASSWORD", "from-env")
    args = build_parser().parse_args(["serve", "--redis", "rediss://kvpool@redis:6380/0"])
    assert (args.redis, args.redis_password) == ("rediss://kvpool@redis:6380/0", "from-env")


def test_gateway_tls_flags_reach_the_settings(tmp_path):
    cert, key = self_signed(tmp_path)
    args = parse(
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-file", str(cert)
    )
    settings = gateway_settings(args, "s:1", 0.0)
    assert settings.tls is not None and settings.tls.cert_chain == cert.read_bytes()
    assert settings.store_tls_ca == cert.read_bytes()  # the gateway and workers verify the store
    with pytest.raises(ValueError, match="go together"):
        gateway_settings(parse("--tls-cert-file", str(cert)), "s:1", 0.0)


def test_http_port_is_off_by_default_and_reaches_the_settings(monkeypatch):
    assert gateway_settings(parse(), "s:1", 0.0).http_port is None  # 0, the flag's default: off
    assert gateway_settings(parse("--http-port", "8000"), "s:1", 0.0).http_port == 8000
    monkeypatch.setenv("KVPOOL_HTTP_PORT", "8001")
    args = build_parser().parse_args(["serve"])
    check_args(args)
    assert gateway_settings(args, "s:1", 0.0).http_port == 8001
    with pytest.raises(ValueError, match=r"--http-port must be between 0 \(off\) and 65535"):
        check_args(parse("--http-port", "70000"))


def test_every_gateway_setting_is_a_flag_or_named_as_not_one():
    """A new field of GatewaySettings (or of its pool, worker or core records) cannot be forgotten
    by the command line: it needs a SettingFlag row or a NOT_FLAGS line saying why not."""
    flagged = {row.setting for row in SETTINGS_FLAGS}
    assert flagged.isdisjoint(NOT_FLAGS)
    assert set(setting_fields()) == flagged | set(NOT_FLAGS)


def test_flag_defaults_are_the_settings_own(monkeypatch):
    for name in [k for k in os.environ if k.startswith("KVPOOL_")]:
        monkeypatch.delenv(name)
    settings = gateway_settings(parse(), "s:1", 0.0)
    library = GatewaySettings(store_target="s:1")
    # Both listen on loopback unless told (issue 14: the binary used to bind 0.0.0.0).
    assert settings.host == library.host == "127.0.0.1"
    assert settings == replace(
        library,
        pool=replace(library.pool, worker=replace(library.pool.worker, store_target="s:1")),
    )


def test_numeric_flags_parse_as_numbers():
    args = parse("--port", "5", "--l1-bytes", "2MiB", "--token-timeout", "1.5", "--grace", "2")
    settings = gateway_settings(args, "s:1", 0.0)
    assert (settings.port, settings.pool.worker.l1_bytes) == (5, 2 << 20)
    assert (settings.gateway.token_timeout_s, settings.grace_s) == (1.5, 2.0)
    assert gateway_settings(parse("--block-ttl", "60"), "s:1", 0.0).pool.worker.block_ttl_s == 60


def test_hardening_flags_default_to_the_settings_defaults():
    """One default per setting: the flags of issue 14 read what the dataclasses hold."""
    import argparse

    from services.gateway.cli import add_gateway_flags
    from services.gateway.settings import GatewayConfig, GatewaySettings

    parser = argparse.ArgumentParser()
    add_gateway_flags(parser)
    args = parser.parse_args([])
    config, settings = GatewayConfig(), GatewaySettings(store_target="127.0.0.1:1")
    assert args.max_prompt_tokens == config.max_prompt_tokens > 0
    assert args.prefill_timeout == config.prefill_timeout_s
    assert args.token_timeout == config.token_timeout_s
    assert (args.max_stop_strings, args.max_stop_chars) == (16, 256)
    assert (config.max_stop_strings, config.max_stop_chars) == (16, 256)
    pool = settings.pool
    assert args.max_requests_per_worker == pool.max_requests_per_worker
    assert 0 < pool.requests_per_worker < pool.resources.max_concurrency
    assert args.max_queued_requests == pool.max_queued_requests
    assert args.queue_timeout == pool.queue_timeout_s


def test_the_gateway_listens_on_loopback_unless_told(monkeypatch):
    """Issue 14: the gateway bound 0.0.0.0 by default, with auth off."""
    monkeypatch.delenv("KVPOOL_HOST", raising=False)
    assert parse().host == "127.0.0.1"
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert parse("--host", "0.0.0.0").host == "0.0.0.0"


def test_the_namespace_secret_reaches_the_gateway_and_its_workers(tmp_path, monkeypatch):
    """Issue 14, item 6: one secret keys the tenant salt in the gateway and in every worker."""
    monkeypatch.delenv("KVPOOL_NAMESPACE_SECRET", raising=False)
    path = tmp_path / "secret"
    path.write_text("namespace-secret-0123456789abcdef\n")
    settings = gateway_settings(parse("--namespace-secret-file", str(path)), "127.0.0.1:1", 0.0)
    assert settings.pool.worker.namespace_secret == b"namespace-secret-0123456789abcdef"
    # None given: a random one, never the tenant's name (issue 23).
    first = gateway_settings(parse(), "127.0.0.1:1", 0.0).pool.worker.namespace_secret
    second = gateway_settings(parse(), "127.0.0.1:1", 0.0).pool.worker.namespace_secret
    assert len(first) >= 32 and first != second
    with pytest.raises(ValueError, match="at least 16 bytes"):
        gateway_settings(parse("--namespace-secret", "short"), "127.0.0.1:1", 0.0)


def test_the_batch_bounds_the_per_worker_cap_and_sizes_the_actor(monkeypatch):
    """Issue 16: --max-requests-per-worker is the batch's admission bound (0: --max-batch), and a
    worker actor has threads for a full batch plus SPARE_THREADS."""
    from services.gateway.settings import SPARE_THREADS

    monkeypatch.setenv("KVPOOL_MAX_BATCH_TOKENS", "512")
    args = parse("--max-batch", "16")
    check_args(args)
    settings = gateway_settings(args, "127.0.0.1:1", 0.0)
    worker = settings.pool.worker
    assert (worker.max_batch, worker.max_batch_tokens) == (16, 512)
    assert settings.pool.requests_per_worker == 16  # the default cap: the whole batch
    assert settings.pool.actor_resources.max_concurrency == 16 + SPARE_THREADS
    default = gateway_settings(parse(), "127.0.0.1:1", 0.0).pool
    assert default.requests_per_worker == default.worker.max_batch == 8
    assert default.actor_resources.max_concurrency > default.requests_per_worker
    with pytest.raises(ValueError, match="--max-requests-per-worker must be at most --max-batch=8"):
        check_args(parse("--max-requests-per-worker", "9"))
    with pytest.raises(ValueError, match="--max-batch-tokens must exceed --max-batch=8"):
        check_args(parse("--max-batch-tokens", "8"))
    with pytest.raises(ValueError, match="max_requests_per_worker must be between 0"):
        replace(default, max_requests_per_worker=9)


# --- issue 23, section 2: the namespace secret is never missing --------------------------------


@pytest.fixture
def no_secret_env(monkeypatch):
    for name in ("KVPOOL_NAMESPACE_SECRET", "KVPOOL_NAMESPACE_SECRET_FILE", "KVPOOL_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("KVPOOL_AUTH_TOKEN_FILE", raising=False)


def test_a_standalone_gateway_with_tenants_and_no_secret_refuses_to_start(
    tmp_path, capsys, no_secret_env
):
    from kvpool.cli import main

    tenants = tmp_path / "tokens"
    tenants.write_text("tenant-token-aaaaaaaa acme\ntenant-token-bbbbbbbb globex\n")
    for extra in ([], ["--auth-token-file", str(tenants)]):  # auth off: requests name tenants
        assert main(["gateway", "serve", "--store", "127.0.0.1:1", *extra]) == 2
        err = capsys.readouterr().err
        assert "no namespace secret" in err and "--namespace-secret-file" in err
        assert "openssl rand -hex 32" in err and "Traceback" not in err
    assert "acme, globex" in err


def test_a_gateway_of_the_default_tenant_alone_runs_with_a_random_secret(
    tmp_path, caplog, no_secret_env
):
    from services.gateway.cli import check_namespace_secret_given

    default_only = tmp_path / "tokens"
    default_only.write_text("default-token-aaaaaaaa\n")
    check_namespace_secret_given(parse("--auth-token-file", str(default_only)))  # no raise
    assert "random one for this process" in caplog.text
    secret = tmp_path / "secret"
    secret.write_text("namespace-secret-0123456789abcdef\n")
    check_namespace_secret_given(parse("--namespace-secret-file", str(secret)))


def test_kvpool_serve_keeps_its_secret_in_a_private_file(tmp_path):
    from kvpool.commands.serve import kept_secret

    first, path, made = kept_secret(tmp_path / "state")
    assert made and len(first) == 64 and (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    again, _, made_again = kept_secret(tmp_path / "state")
    assert again == first and not made_again
    path.chmod(0o644)
    with pytest.raises(ValueError, match=r"may be read by others.*chmod 600"):
        kept_secret(tmp_path / "state")
    path.chmod(0o600)
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError, match=r"at least 16 bytes.*delete it"):
        kept_secret(tmp_path / "state")


# --- issue 23, section 4: no anonymous gateway on the network ----------------------------------


def test_serving_the_network_with_auth_off_is_refused_unless_asked_for(capsys, no_secret_env):
    """The gateway bound 0.0.0.0 with auth off and said nothing."""
    from kvpool.cli import main
    from services.gateway.cli import check_exposure

    for command in (["gateway", "serve", "--store", "127.0.0.1:1"], ["serve"]):
        assert main([*command, "--host", "0.0.0.0"]) == 2
        err = capsys.readouterr().err
        assert "--host 0.0.0.0 serves the network but auth is off" in err
        assert "--insecure-no-auth" in err and "Traceback" not in err
    check_exposure(parse("--host", "127.0.0.1"))  # loopback: fine
    check_exposure(parse("--host", "0.0.0.0", "--auth-token", "a-long-enough-token-0123"))
    check_exposure(parse("--host", "0.0.0.0", "--insecure-no-auth"))  # asked for: a warning


def test_metrics_listen_on_loopback_unless_told(no_secret_env):
    """/metrics named tenants to anyone who reached --host."""
    settings = gateway_settings(parse("--host", "0.0.0.0", "--metrics-port", "9"), "s:1", 0.0)
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "127.0.0.1")
    told = gateway_settings(parse("--metrics-host", "10.0.0.7"), "s:1", 0.0)
    assert told.metrics_host == "10.0.0.7"
