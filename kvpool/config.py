"""Settings from flags and environment variables.

Every server flag `--some-flag` can also be set as `KVPOOL_SOME_FLAG`; the flag wins. This module
is the one place that rule is written down (see docs/configuration.md).
"""

import os
from pathlib import Path


def env_name(flag: str) -> str:
    """`--max-block-bytes` -> `KVPOOL_MAX_BLOCK_BYTES`."""
    return "KVPOOL_" + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default: str | int | float | None) -> str | int | float | None:
    """The default of `flag`: its environment variable when set, else `default`.

    argparse applies its `type` to string defaults, so the environment value is parsed and
    validated like a command-line value.
    """
    return os.environ.get(env_name(flag), default)


def cache_dir() -> Path:
    """Where converted models and other derived files live (`KVPOOL_CACHE_DIR`)."""
    return Path(os.environ.get("KVPOOL_CACHE_DIR", Path.home() / ".cache" / "kvpool")).expanduser()


def state_dir() -> Path:
    """Where `kvpool serve` keeps what must outlive a restart, such as its namespace secret
    (`KVPOOL_STATE_DIR`, else `$XDG_STATE_HOME/kvpool`, else `~/.local/state/kvpool`)."""
    explicit = os.environ.get("KVPOOL_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser() / "kvpool"
