"""Reading Compose files offline, the way `docker compose config` does, for the deploy tests.

Three pieces of Compose behaviour that plain YAML does not have:
- the `!reset` and `!override` tags of override files (Compose 2.24+);
- merging an override file into a base file (compose-spec "merge" rules);
- `${VAR}` interpolation from the environment, with `:-` defaults and `:?` required variables.

And one for our own commands: splitting a `bash -c` script into the simple commands it runs.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Reset:
    """`key: !reset ...` in an override file: the key is removed from the merged model."""

    value: Any


@dataclass(frozen=True, slots=True)
class Override:
    """`key: !override ...`: the value replaces the base value instead of merging with it."""

    value: Any


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(kind: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return kind(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return kind(loader.construct_sequence(node, deep=True))
        return kind(loader.construct_scalar(node))

    return construct


_ComposeLoader.add_constructor("!reset", _tagged(Reset))
_ComposeLoader.add_constructor("!override", _tagged(Override))


def load(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        return yaml.load(handle, Loader=_ComposeLoader)  # a SafeLoader subclass


def strip_tags(node: Any) -> Any:
    """The file as a standalone document: each tagged value as its plain value."""
    if isinstance(node, Reset | Override):
        return strip_tags(node.value)
    if isinstance(node, dict):
        return {key: strip_tags(value) for key, value in node.items()}
    if isinstance(node, list):
        return [strip_tags(value) for value in node]
    return node


# Attributes whose sequences an override replaces instead of appending to (compose-spec merge).
_REPLACED = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str | None = None) -> Any:
    if isinstance(override, Override):
        return strip_tags(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, Reset):
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], value, name)
            else:
                merged[name] = strip_tags(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED:
        return base + [item for item in strip_tags(override) if item not in base]
    return strip_tags(override)


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(ValueError):
    pass


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Substitute `${VAR}` forms like Compose; `$$` becomes a literal `$` for the container."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and (value is None if op == "-" else unset_or_empty):
            return interpolate(arg, env)
        if op in (":?", "?") and (value is None if op == "?" else unset_or_empty):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, node)


def command_words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


_SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}
_KEYWORDS = {"exec", "env", "until", "while", "do", "then", "if", "!"}
_SEPARATORS = {"&&", "||", ";", "|", "&", "\n"}


def simple_commands(command: str | list[str]) -> list[list[str]]:
    """The simple commands a service runs: `["bash", "-c", "a && exec b"]` -> [a, b].

    Shell keywords, `exec`, `env` and leading `VAR=value` assignments are dropped, so each result
    starts with the program that runs (`kvpool`, `ray`, `redis-server`, ...).
    """
    words = command_words(command)
    if len(words) >= 3 and words[0] in _SHELLS and words[1] in ("-c", "-lc"):
        script = words[2].replace("\\\n", " ").replace("\n", " ; ")  # continuations, lines
        script = re.sub(r"\d*>&\d+|\d*[<>]+\s*\S+", " ", script)  # redirections
        lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        tokens = list(lexer)
    else:
        tokens = words
    commands: list[list[str]] = []
    current: list[str] = []
    for token in [*tokens, ";"]:
        if token in _SEPARATORS:
            while current and (current[0] in _KEYWORDS or re.match(r"^\w+=", current[0])):
                current.pop(0)
            if current and current[0] not in ("done", "fi"):
                commands.append(current)
            current = []
        else:
            current.append(token)
    return commands
