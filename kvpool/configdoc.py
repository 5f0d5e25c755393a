"""The flag tables of docs/configuration.md, rendered from the real parsers.

The doc's tables sit between two marker lines and are regenerated with `make docs`; a test fails
when they differ from what the parsers say, so the documented flags, defaults and environment
variables cannot drift from the code.
"""

import argparse
import os
from pathlib import Path

from kvpool.cli import build_parser
from kvpool.config import env_name

BEGIN = "<!-- BEGIN GENERATED FLAGS (make docs) -->"
END = "<!-- END GENERATED FLAGS -->"
# The long-running processes an operator configures; their value flags all read KVPOOL_<FLAG>.
SERVER_COMMANDS = (("serve",), ("store", "serve"), ("gateway", "serve"))
CLIENT_COMMANDS = (("generate",),)


def command_parser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def value_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options that take a value (not --help, not on/off switches)."""
    return [
        a
        for a in parser._actions
        if a.option_strings and a.nargs != 0 and not isinstance(a, argparse._HelpAction)
    ]


def render() -> str:
    # Defaults are shown as the code has them, not as this shell's environment overrides them.
    saved = {k: v for k, v in os.environ.items() if k.startswith("KVPOOL_")}
    for key in saved:
        del os.environ[key]
    try:
        sections = [_table(words, env=True) for words in SERVER_COMMANDS]
        sections += [_table(words, env=False) for words in CLIENT_COMMANDS]
    finally:
        os.environ.update(saved)
    return "\n".join([BEGIN, "", *sections, END])


def _table(words: tuple[str, ...], env: bool) -> str:
    parser = command_parser(words)
    lines = [f"### `kvpool {' '.join(words)}`", ""]
    lines += ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1]
        takes_value = action.nargs != 0
        variable = f"`{env_name(flag)}`" if env and takes_value else ""
        default = "" if action.default in (None, False, []) else f"`{action.default}`"
        meaning = (action.help or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{flag}` | {variable} | {default} | {meaning} |")
    return "\n".join([*lines, ""])


def update(path: Path) -> bool:
    """Rewrite the generated part of `path`; True when it changed."""
    text = path.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render() + text[stop:]
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update(Path(__file__).resolve().parents[1] / "docs" / "configuration.md")
    print("docs/configuration.md", "updated" if changed else "unchanged")
