"""What a store key may be, checked in this one place (docs/store.md, "Keys").

The store is content-agnostic: a key is an opaque string. It is restricted to a small printable
ASCII set so that keys are safe in logs, Redis commands and URLs, and bounded so that a request of
many keys stays small. Callers build their own keys (`kvpool:blk:<64 hex>` for blocks,
`kvpool:sess:<64 hex>` for sessions); the store only checks the syntax, and keeps keys of the
session class apart from blocks, where no block eviction reaches them (backends/split.py).
"""

import re
from collections.abc import Sequence

from kvpool.errors import InvalidArgument, ResourceExhausted

MAX_KEY_CHARS = 200
SESSION_KEY_PREFIX = "kvpool:sess:"  # the key class kept out of the blocks' eviction
KEY_RULE = f"keys are 1 to {MAX_KEY_CHARS} characters from A-Z a-z 0-9 and : . _ -"
_KEY = re.compile(r"[A-Za-z0-9:._-]{1,%d}" % MAX_KEY_CHARS)  # noqa: UP031 (regex braces)


def check_key(key: str) -> None:
    """Raise InvalidArgument, stating the rule, unless `key` is well formed."""
    if not _KEY.fullmatch(key):
        shown = key if len(key) <= 40 else key[:40] + "..."
        raise InvalidArgument(f"invalid key {shown!r}: {KEY_RULE}")


def check_keys(keys: Sequence[str], max_keys: int) -> None:
    """Check a request's keys: at most `max_keys` of them, each well formed."""
    if len(keys) > max_keys:
        raise ResourceExhausted(f"{len(keys)} keys in one request; the limit is {max_keys}")
    for key in keys:
        check_key(key)
