"""kv_connector_extra_config as another team's script writes it: the documented names work, and
every mistake stops the engine at start with a message that says what is allowed."""

import pytest

from kvpool.errors import InvalidArgument
from kvpool.integrations.vllm_settings import ConnectorSettings

SECRET = "0123456789abcdef0123456789abcdef"


def test_the_documented_names_and_their_defaults():
    s = ConnectorSettings.from_extra(
        {"store": "10.0.0.5:50052", "codec": "int4", "auth_token": "t", "tenant": "team-a"},
        env={"KVPOOL_NAMESPACE_SECRET": SECRET},
    )
    assert (s.store, s.codec, s.auth_token, s.tenant) == ("10.0.0.5:50052", "int4", "t", "team-a")
    assert s.namespace_secret == SECRET.encode()
    plain = ConnectorSettings.from_extra({"store": "h:1"}, env={})
    assert (plain.codec, plain.plan, plain.on_load_error, plain.tenant) == (
        "int8", "auto", "recompute", None,
    )  # fmt: skip
    assert (plain.metrics_port, plain.metrics_host) == (None, "127.0.0.1")  # no server of its own
    assert plain.save_decode  # a conversation's answers are saved for its next turn
    assert not ConnectorSettings.from_extra({"store": "h:1", "save_decode": False}).save_decode
    served = ConnectorSettings.from_extra(
        {"store": "h:1", "metrics_port": 9464, "metrics_host": "0.0.0.0"}, env={}
    )
    assert (served.metrics_port, served.metrics_host) == (9464, "0.0.0.0")


def test_secrets_come_from_the_environment_when_not_given():
    s = ConnectorSettings.from_extra(
        {"store": "h:1"}, env={"KVPOOL_STORE_AUTH_TOKEN": "tok", "KVPOOL_NAMESPACE_SECRET": SECRET}
    )
    assert s.auth_token == "tok" and s.namespace_secret == SECRET.encode()


@pytest.mark.parametrize(
    "kv_dtype, spec", [("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")]
)
def test_raw_is_the_kv_caches_own_dtype(kv_dtype, spec):
    assert (
        ConnectorSettings.from_extra({"store": "h:1", "codec": "raw"}, env={}).codec_for(kv_dtype)
        == spec
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, 'needs "store"'),
        ({"store": "nohostport"}, "HOST:PORT"),
        ({"store": "h:1", "codec": "zip"}, "codec must be raw or one of"),
        ({"store": "h:1", "tenant": "a"}, "needs a namespace secret"),
        ({"store": "h:1", "namespace_secret": "short"}, "at least 16 bytes"),
        ({"store": "h:1", "block_tokens": 0}, "block_tokens must be a positive int"),
        ({"store": "h:1", "timeout_s": 0}, "timeout_s must be in"),
        ({"store": "h:1", "plan": "sometimes"}, "plan must be one of auto, fetch, recompute"),
        ({"store": "h:1", "on_load_error": "ignore"}, "on_load_error must be one of"),
        ({"store": "h:1", "metrics_port": 0}, r"metrics_port must be an int in \[1, 65535\]"),
        ({"store": "h:1", "save_decode": "yes"}, "save_decode must be true or false"),
        ({"store": "h:1", "metrics_port": "9464"}, "metrics_port must be an int"),
        ({"store": "h:1", "metrics_host": ""}, "metrics_host must be a host name or address"),
        ({"store": "h:1", "stor": "x"}, "unknown kv_connector_extra_config keys"),
        ({"store": "h:1", "metrics": 1}, "allowed: .*'metrics_host', 'metrics_port'"),
    ],
)
def test_mistakes_are_refused_with_what_is_allowed(extra, message):
    with pytest.raises((InvalidArgument, ValueError), match=message):
        ConnectorSettings.from_extra(extra, env={})
