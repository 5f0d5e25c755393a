"""Configuration is documented where the code defines it, and every server flag has its variable."""

from pathlib import Path

import pytest

from kvpool import configdoc
from kvpool.config import env_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_doc_matches_the_parsers():
    text = DOC.read_text()
    start = text.index(configdoc.BEGIN)
    stop = text.index(configdoc.END) + len(configdoc.END)
    assert text[start:stop] == configdoc.render(), "docs/configuration.md is stale: run make docs"


SERVER_FLAGS = [
    (words, action.option_strings[-1])
    for words in configdoc.SERVER_COMMANDS
    for action in configdoc.value_flags(configdoc.command_parser(words))
]


@pytest.mark.parametrize(
    ("words", "flag"), SERVER_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v
)
def test_every_server_flag_reads_its_environment_variable(monkeypatch, words, flag):
    sentinel = "from-the-environment"
    monkeypatch.setenv(env_name(flag), sentinel)
    parser = configdoc.command_parser(words)
    action = next(a for a in parser._actions if flag in a.option_strings)
    assert action.default == sentinel, f"kvpool {' '.join(words)} {flag} ignores {env_name(flag)}"
