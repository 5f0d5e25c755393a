"""Token files, the server's token check, what clients send, and TLS settings (no network)."""

import pytest

from services.auth import (
    ServerTls,
    TokenTable,
    call_metadata,
    client_token,
    parse_token_file,
    server_tokens,
    store_tokens,
)

FILE = """
# token                          tenant
tok-acme-0123456789abcdef         acme
tok-globex-0123456789abcdef       globex   # trailing comment
tok-default-0123456789abcdef
"""


def test_token_file_maps_tokens_to_tenants():
    table = parse_token_file(FILE)
    assert table.tenant_for("Bearer tok-acme-0123456789abcdef") == "acme"
    assert table.tenant_for(b"Bearer tok-globex-0123456789abcdef") == "globex"
    assert table.tenant_for("Bearer tok-default-0123456789abcdef") == ""  # bare: default tenant
    assert table.first_token == "tok-acme-0123456789abcdef"


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "",
        "tok-acme-0123456789abcdef",
        "Bearer tok-acme-0123456789abcde",
        "Bearer tok-acme-0123456789abcdef ",
        "Bearertok-acme-0123456789abcdef",
        "Basic tok-acme-0123456789abcdef",
        "Basic x",
    ],
)
def test_anything_but_an_exact_bearer_token_is_refused(sent):
    assert parse_token_file(FILE).tenant_for(sent) is None


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR", "Bearer  "])
def test_the_bearer_scheme_is_case_insensitive(scheme):
    """Issue 23: `bearer` in lower case was refused, though the scheme is case-insensitive."""
    assert parse_token_file(FILE).tenant_for(f"{scheme} tok-acme-0123456789abcdef") == "acme"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no token"),
        ("# only a comment\n", "no token"),
        ("a b c\n", "line 1: expected 'TOKEN' or 'TOKEN TENANT'"),
        (
            "tok-0123456789abcdef\ntok-0123456789abcdef other\n",
            "line 2: this token is listed twice",
        ),
        ("tok-0123456789abcdef bad/tenant\n", "line 1: tenant 'bad/tenant'"),
        ("tök\n", "line 1: a token must be visible ASCII"),
        ("short-token acme\n", "line 1: a token must be at least 16 characters, got 11"),
        ("#commented-token-0123 acme\n", "no token"),
    ],
)
def test_bad_token_files_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_token_file(text, "tokens.txt")


def test_server_accepts_the_file_and_the_env_token(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(FILE)
    table = server_tokens("env-token-0123456789", str(path))
    assert table is not None
    assert table.tenant_for("Bearer env-token-0123456789") == ""
    assert table.tenant_for("Bearer tok-acme-0123456789abcdef") == "acme"
    assert server_tokens(None, None) is None  # auth off
    with pytest.raises(ValueError, match="cannot read the auth token file"):
        server_tokens(None, str(tmp_path / "missing"))


def test_client_sends_the_first_token_of_its_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("only-token-0123456789\n")  # a one-token file serves server and client alike
    assert client_token("ignored", str(path)) == "only-token-0123456789"
    assert client_token(" env-token \n", None) == "env-token"
    assert client_token(None, None) is None
    assert call_metadata("t") == (("authorization", "Bearer t"),)
    assert call_metadata(None) is None


def test_a_token_table_hides_its_tokens_from_repr():
    assert "secret" not in repr(TokenTable({"secret-token": "acme"}))


def test_tls_needs_both_cert_and_key(tmp_path):
    assert ServerTls.from_files(None, None) is None
    with pytest.raises(ValueError, match="go together"):
        ServerTls.from_files(str(tmp_path / "cert.pem"), None)
    with pytest.raises(ValueError, match="cannot read the TLS certificate"):
        ServerTls.from_files(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


def test_a_hash_inside_a_token_is_part_of_it():
    """Issue 14: '#' anywhere cut the token there and accepted its prefix."""
    table = parse_token_file("abcdefgh#ijklmnopqrstuvwx acme # a comment\n")
    assert table.tenant_for("Bearer abcdefgh#ijklmnopqrstuvwx") == "acme"
    assert table.tenant_for("Bearer abcdefgh") is None


def test_servers_refuse_short_tokens(tmp_path):
    with pytest.raises(ValueError, match="at least 16 characters"):
        server_tokens("short", None)
    with pytest.raises(ValueError, match="at least 16 characters"):
        store_tokens("short", None, env={})
