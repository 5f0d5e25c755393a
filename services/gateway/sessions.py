"""Sessions: a conversation's token history, kept in the KVStore as a small msgpack value.

A session is nothing but the tokens fed so far (every prompt and every output, in order). A new
turn's prompt is the history plus the new input, so the previous turns are an exact prefix and
their blocks come from the cache on whichever worker serves the turn. The gateway holds no session
state of its own: any gateway replica can serve any turn.

Value layout (docs/gateway.md, "Sessions"): a msgpack map
`{"v": 2, "owner": str, "tokens": bytes (uint32 little-endian), "turns": int, "created": float,
"updated": float, "window": [max_cache_tokens, sink_tokens]}` under the key from `session_key`.
Both the key and `owner` are HMAC-SHA-256 of the tenant and the session id under the
deployment's namespace secret, so neither a tenant's name nor a session id shows in the store,
and no one without the secret can compute a session's key from them. Values are untrusted like
any store data: a value that does not parse, or belongs to another tenant or id, is refused as
DataLoss and never used as a prompt. (Version 1 values, keyed by a plain SHA-256 and naming their
tenant, are under other keys and are never read: their sessions start anew.)

Concurrent turns on one session are last-writer-wins: the later turn's history replaces the
earlier one's. Clients that need strict ordering send turns one at a time.
"""

import hashlib
import hmac
import logging
import re
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import msgpack

from kvpool.errors import DataLoss, InvalidArgument, KvpoolError, NotFound
from services.store.keys import SESSION_KEY_PREFIX  # the store keeps this class apart
from workers.kv.bounds import DEFAULT_SINK_TOKENS
from workers.kv.hashing import check_namespace_secret, new_namespace_secret

log = logging.getLogger(__name__)


@contextmanager
def _store_errors(what: str) -> Iterator[None]:
    """Store failures reach the gateway's clients without the store's address or Redis URL.

    The full message goes to the gateway's log; the client gets the same error class (so the same
    status code) with a message that names only what failed.
    """
    try:
        yield
    except KvpoolError as exc:
        log.warning("session %s failed: %s", what, exc)
        raise type(exc)(f"the session store could not {what} the session; try again") from None


SESSION_FORMAT_VERSION = 2
_SESSION_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
_UINT32_MAX = 2**32 - 1


class MetadataStore(Protocol):
    """The part of `services.store.client.StoreClient` sessions use."""

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]: ...

    def put_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int | None = None) -> int: ...

    def delete(self, keys: Sequence[str]) -> int: ...


def check_session_id(session_id: str) -> str:
    if not _SESSION_ID.fullmatch(session_id):
        raise InvalidArgument(
            "session_id must be 1-128 characters of letters, digits, '.', '_', '~' or '-', "
            f"got {session_id[:40]!r}{'...' if len(session_id) > 40 else ''}"
        )
    return session_id


def session_key(tenant: str, session_id: str, secret: bytes) -> str:
    """The store key of a session: the one place it is built.

    The tenant and id are MACed together rather than spliced in, so no tenant name can be crafted
    to collide with another's key, tenant names do not show in the store's keyspace, and without
    the namespace secret no one can compute a session's key from its tenant and id.
    """
    return SESSION_KEY_PREFIX + _mac(secret, b"kvpool.session\x00", tenant, session_id)


def _owner(tenant: str, session_id: str, secret: bytes) -> str:
    """What a value records of whose it is (checked on read), in a domain apart from the key."""
    return _mac(secret, b"kvpool.session-owner\x00", tenant, session_id)


def _mac(secret: bytes, domain: bytes, tenant: str, session_id: str) -> str:
    message = domain + _length_prefixed(tenant) + _length_prefixed(session_id)
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<I", len(encoded)) + encoded


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    tenant: str
    token_ids: tuple[int, ...]
    turns: int
    created_unix_s: float
    updated_unix_s: float
    # The cache bound its turns run with (workers.window); later turns keep it unless they ask
    # for another. 0: unbounded.
    max_cache_tokens: int = 0
    sink_tokens: int = DEFAULT_SINK_TOKENS

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        if self.turns < 0:
            raise ValueError(f"Session.turns must be >= 0, got {self.turns}")

    def with_turn(
        self,
        token_ids: Sequence[int],
        now: float | None = None,
        window: tuple[int, int] | None = None,
    ) -> "Session":
        """The session after a turn whose whole fed sequence (history included) is `token_ids`.

        `window` is the turn's (max_cache_tokens, sink_tokens); None keeps the session's.
        """
        max_cache_tokens, sink_tokens = window or (self.max_cache_tokens, self.sink_tokens)
        return Session(
            session_id=self.session_id,
            tenant=self.tenant,
            token_ids=tuple(token_ids),
            turns=self.turns + 1,
            created_unix_s=self.created_unix_s,
            updated_unix_s=time.time() if now is None else now,
            max_cache_tokens=max_cache_tokens,
            sink_tokens=sink_tokens,
        )


def encode_session(session: Session, secret: bytes) -> bytes:
    tokens = session.token_ids
    if any(not 0 <= t <= _UINT32_MAX for t in tokens):
        raise InvalidArgument("session token ids must be in [0, 2**32)")
    return msgpack.packb(
        {
            "v": SESSION_FORMAT_VERSION,
            "owner": _owner(session.tenant, session.session_id, secret),
            "tokens": struct.pack(f"<{len(tokens)}I", *tokens),
            "turns": session.turns,
            "created": session.created_unix_s,
            "updated": session.updated_unix_s,
            "window": [session.max_cache_tokens, session.sink_tokens],
        },
        use_bin_type=True,
    )


def decode_session(data: bytes, *, tenant: str, session_id: str, secret: bytes) -> Session:
    """Parse a stored value, refusing anything malformed or stored for another tenant or id."""
    try:
        record = msgpack.unpackb(data, raw=False, max_bin_len=1 << 26, max_str_len=1 << 16)
        if not isinstance(record, dict):
            raise ValueError("not a msgpack map")
        if record.get("v") != SESSION_FORMAT_VERSION:
            raise ValueError(f"unsupported session format version {record.get('v')!r}")
        packed = record["tokens"]
        if not isinstance(packed, bytes) or len(packed) % 4:
            raise ValueError("token bytes are not a uint32 array")
        owner = record["owner"]
        if not isinstance(owner, str) or not hmac.compare_digest(
            owner, _owner(tenant, session_id, secret)
        ):
            raise ValueError("value belongs to another session")
        max_cache_tokens, sink_tokens = record.get("window", (0, DEFAULT_SINK_TOKENS))
        window = (max_cache_tokens, sink_tokens)
        if not all(type(v) is int and 0 <= v <= _UINT32_MAX for v in window):
            raise ValueError("window is not two unsigned integers")
        return Session(
            session_id=session_id,
            tenant=tenant,
            token_ids=struct.unpack(f"<{len(packed) // 4}I", packed),
            turns=int(record["turns"]),
            created_unix_s=float(record["created"]),
            updated_unix_s=float(record["updated"]),
            max_cache_tokens=max_cache_tokens,
            sink_tokens=sink_tokens,
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise DataLoss(f"session {session_id!r} is stored in an unreadable form: {exc}") from None


class SessionStore:
    """Reads and writes sessions through the KVStore client.

    `secret` keys session keys and owners: the deployment's namespace secret (a random one for
    this store alone when none is given).
    """

    def __init__(
        self,
        store: MetadataStore,
        ttl_s: int | None = 24 * 3600,
        secret: bytes | None = None,
    ) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"session ttl must be > 0 seconds or None, got {ttl_s}")
        self._store = store
        self._ttl_s = ttl_s
        self._secret = check_namespace_secret(secret or new_namespace_secret())

    def key(self, tenant: str, session_id: str) -> str:
        return session_key(tenant, session_id, self._secret)

    @property
    def ttl_s(self) -> int | None:
        return self._ttl_s

    def find(self, tenant: str, session_id: str) -> Session | None:
        check_session_id(session_id)
        key = self.key(tenant, session_id)
        with _store_errors("read"):
            data = self._store.get_many([key]).get(key)
        if data is None:
            return None
        return decode_session(data, tenant=tenant, session_id=session_id, secret=self._secret)

    def get(self, tenant: str, session_id: str) -> Session:
        session = self.find(tenant, session_id)
        if session is None:
            raise NotFound(f"session {session_id!r} does not exist (or has expired)")
        return session

    def open(self, tenant: str, session_id: str) -> Session:
        """The session, or a new empty one (not stored until its first turn is saved)."""
        session = self.find(tenant, session_id)
        if session is not None:
            return session
        now = time.time()
        return Session(session_id, tenant, (), turns=0, created_unix_s=now, updated_unix_s=now)

    def save(self, session: Session) -> None:
        key = self.key(session.tenant, session.session_id)
        value = encode_session(session, self._secret)
        with _store_errors("save"):
            self._store.put_many([(key, value)], ttl_s=self._ttl_s)

    def delete(self, tenant: str, session_id: str) -> None:
        check_session_id(session_id)
        with _store_errors("delete"):
            deleted = self._store.delete([self.key(tenant, session_id)])
        if deleted == 0:
            raise NotFound(f"session {session_id!r} does not exist (or has expired)")


class LiveSessions:
    """Sessions this gateway opened that have not expired: what `--max-sessions` counts, and
    the witness that tells a lost session from a new one.

    The store alone cannot count them cheaply (sessions are hashed keys among blocks), so each
    gateway counts its own: a session is live from its first turn until its TTL passes with no
    turn through this gateway, or until it is deleted here. With several gateway replicas the
    limit applies to each. `per_tenant` (`--max-sessions-per-tenant`) caps each tenant's share,
    so one tenant cannot take every slot. Expired entries are pruned as the table grows, limit
    or not: every turn touches its session, and without pruning the table grew forever.

    A session this gateway saved a turn of (`touch`), still within its TTL, that the store no
    longer holds was lost (a store that evicted or forgot it), not expired: `saved` says so, and
    the core answers NOT_FOUND instead of starting it anew.
    """

    def __init__(self, ttl_s: int | None, clock=time.monotonic, *, per_tenant: int = 0) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._per_tenant = per_tenant
        # (tenant, session id) -> (expires at, whether a turn of it was saved)
        self._expiry: dict[tuple[str, str], tuple[float, bool]] = {}
        self._tenants: dict[str, int] = {}  # tenant -> live sessions
        self._prune_at = 1024  # prune when the table reaches this size
        self._lock = threading.Lock()

    def _expires(self) -> float:
        return float("inf") if self._ttl_s is None else self._clock() + self._ttl_s

    def _add(self, key: tuple[str, str], saved: bool) -> None:
        tenant = key[0]
        if key not in self._expiry:
            self._tenants[tenant] = self._tenants.get(tenant, 0) + 1
        else:
            saved = saved or self._expiry[key][1]
        self._expiry[key] = (self._expires(), saved)
        if len(self._expiry) >= self._prune_at:
            self._prune()
            self._prune_at = max(1024, 2 * len(self._expiry))

    def _remove(self, key: tuple[str, str]) -> None:
        self._expiry.pop(key)
        tenant = key[0]
        left = self._tenants[tenant] - 1
        if left:
            self._tenants[tenant] = left
        else:
            del self._tenants[tenant]

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, (at, _) in self._expiry.items() if at <= now]:
            self._remove(key)

    def reserve(self, tenant: str, session_id: str, limit: int) -> bool:
        """Count a new session unless a limit is reached; False when refused."""
        return self.admit(tenant, session_id, limit) is None

    def admit(self, tenant: str, session_id: str, limit: int) -> str | None:
        """Count a new session; None when counted, else the flag of the limit that refused it."""
        key = (tenant, session_id)
        with self._lock:
            if key in self._expiry:
                return None
            self._prune()
            if limit and len(self._expiry) >= limit:
                return "--max-sessions"
            if self._per_tenant and self._tenants.get(tenant, 0) >= self._per_tenant:
                return "--max-sessions-per-tenant"
            self._add(key, saved=False)
            return None

    def touch(self, tenant: str, session_id: str) -> None:
        """A turn of the session was saved."""
        with self._lock:
            self._add((tenant, session_id), saved=True)

    def saved(self, tenant: str, session_id: str) -> bool:
        """Whether this gateway saved a turn of the session within its TTL."""
        with self._lock:
            entry = self._expiry.get((tenant, session_id))
            return entry is not None and entry[1] and entry[0] > self._clock()

    def forget(self, tenant: str, session_id: str) -> None:
        with self._lock:
            key = (tenant, session_id)
            if key in self._expiry:
                self._remove(key)

    def __len__(self) -> int:
        with self._lock:
            self._prune()
            return len(self._expiry)
