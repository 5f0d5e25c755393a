import hashlib
import hmac

import msgpack
import pytest

from kvpool.errors import DataLoss, InvalidArgument, NotFound
from services.gateway.sessions import (
    SESSION_KEY_PREFIX,
    LiveSessions,
    Session,
    SessionStore,
    check_session_id,
    decode_session,
    encode_session,
    session_key,
)
from services.store.keys import check_key


class DictStore:
    def __init__(self):
        self.data, self.ttls = {}, {}

    def get_many(self, keys):
        return {k: self.data[k] for k in keys if k in self.data}

    def put_many(self, items, ttl_s=None):
        for k, v in items:
            self.data[k], self.ttls[k] = v, ttl_s
        return len(items)

    def delete(self, keys):
        return sum(self.data.pop(k, None) is not None for k in keys)


SECRET = b"sessions-namespace-secret-0123456789"


def test_session_key_is_a_valid_store_key_and_separates_tenants():
    key = session_key("acme", "chat-1", SECRET)
    check_key(key)
    assert key.startswith(SESSION_KEY_PREFIX)
    assert key == session_key("acme", "chat-1", SECRET)
    assert key != session_key("other", "chat-1", SECRET)
    # Length-prefixing: ("a", "b:c") and ("a:b", "c") cannot collide.
    assert session_key("a", "bc", SECRET) != session_key("ab", "c", SECRET)


def test_session_key_is_pinned():
    # A change here orphans every stored session: bump SESSION_FORMAT_VERSION and migrate instead.
    assert session_key("", "s1", SECRET) == (
        "kvpool:sess:e448ace21038af2b4fc2621303419db19503a1a08f512816182df680c598143b"
    )
    tag = b"kvpool.session\x00" + b"\0\0\0\0" + b"\x02\0\0\0s1"  # length-prefixed "", "s1"
    assert (
        session_key("", "s1", SECRET)
        == "kvpool:sess:" + hmac.new(SECRET, tag, "sha256").hexdigest()
    )


def test_no_session_key_or_value_is_derivable_from_a_tenants_name():
    """Issue 23: a session's key was SHA-256 of its tenant and id, and its value named both:
    anyone who knew a tenant's name (and a likely session id) found its conversations."""
    backend = DictStore()
    SessionStore(backend, secret=SECRET).save(Session("chat-1", "acme", (1, 2), 1, 0.0, 0.0))
    ((key, value),) = backend.data.items()
    unkeyed = hashlib.sha256(b"kvpool.session\x00\x04\0\0\0acme\x06\0\0\0chat-1").hexdigest()
    assert key != SESSION_KEY_PREFIX + unkeyed
    assert key != session_key("acme", "chat-1", b"another-secret-0123456789abcdef")
    assert b"acme" not in value and b"chat-1" not in value


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "semi;colon", "slash/"])
def test_session_ids_are_checked(bad):
    with pytest.raises(InvalidArgument, match="session_id must be"):
        check_session_id(bad)


def test_round_trip_and_turns():
    store = SessionStore(DictStore(), ttl_s=60)
    fresh = store.open("t", "s1")
    assert fresh.token_ids == () and fresh.turns == 0
    assert store.find("t", "s1") is None  # opening does not store
    store.save(fresh.with_turn([1, 2, 3]))
    again = store.get("t", "s1")
    assert again.token_ids == (1, 2, 3) and again.turns == 1
    store.save(again.with_turn([1, 2, 3, 4, 5]))
    assert store.get("t", "s1").turns == 2


def test_ttl_is_passed_to_the_store():
    backend = DictStore()
    SessionStore(backend, ttl_s=60).save(Session("s1", "", (1,), 1, 0.0, 0.0))
    assert list(backend.ttls.values()) == [60]


def test_unknown_session_is_not_found():
    store = SessionStore(DictStore())
    with pytest.raises(NotFound, match="'nope' does not exist"):
        store.get("", "nope")
    with pytest.raises(NotFound):
        store.delete("", "nope")


def test_another_tenant_cannot_read_a_session():
    store = SessionStore(DictStore())
    store.save(Session("s1", "a", (1, 2), 1, 0.0, 0.0))
    assert store.find("b", "s1") is None


def test_a_value_for_another_session_under_the_key_is_data_loss():
    data = encode_session(Session("s1", "a", (1, 2), 1, 0.0, 0.0), SECRET)
    with pytest.raises(DataLoss, match="another session"):
        decode_session(data, tenant="a", session_id="s2", secret=SECRET)
    with pytest.raises(DataLoss, match="another session"):
        decode_session(data, tenant="b", session_id="s1", secret=SECRET)
    with pytest.raises(DataLoss, match="another session"):
        decode_session(data, tenant="a", session_id="s1", secret=b"other-secret-0123456789abc")


@pytest.mark.parametrize(
    "value",
    [
        b"\x00garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99}),
        msgpack.packb({"v": 1, "tenant": "", "id": "s1", "tokens": b"\x01\x02\x03"}),
        msgpack.packb({"v": 2, "owner": "x", "tokens": b"\x01\x02\x03"}),
    ],
)
def test_unreadable_values_are_data_loss(value):
    with pytest.raises(DataLoss, match="unreadable"):
        decode_session(value, tenant="", session_id="s1", secret=SECRET)


def test_live_sessions_count_until_expiry_or_delete():
    now = [0.0]
    live = LiveSessions(ttl_s=10, clock=lambda: now[0])
    assert live.reserve("t", "s1", limit=2) and live.reserve("t", "s2", limit=2)
    assert not live.reserve("t", "s3", limit=2)
    assert live.reserve("t", "s1", limit=2)  # an existing session is never refused
    assert live.reserve("u", "s3", limit=3)  # tenants share one count per gateway
    live.forget("u", "s3")
    now[0] = 5.0
    live.touch("t", "s1")  # a turn keeps it alive
    now[0] = 11.0  # s2 expired, s1 lives until 15
    assert len(live) == 1
    assert live.reserve("t", "s3", limit=2)


def test_one_tenant_cannot_take_every_live_session():
    """Issue 14, item 11: --max-sessions was one pool for all tenants."""
    live = LiveSessions(ttl_s=10, per_tenant=2)
    assert live.admit("greedy", "s1", limit=10) is None
    assert live.admit("greedy", "s2", limit=10) is None
    assert live.admit("greedy", "s3", limit=10) == "--max-sessions-per-tenant"
    assert live.admit("polite", "s1", limit=10) is None
    live.forget("greedy", "s1")
    assert live.admit("greedy", "s3", limit=10) is None


def test_turns_do_not_grow_the_table_without_limits():
    """Issue 14, item 11: every turn touched its session and nothing pruned the table."""
    now = [0.0]
    live = LiveSessions(ttl_s=10, clock=lambda: now[0])
    for n in range(50_000):
        now[0] = n * 0.01  # 100 new sessions a second, each living 10 s
        live.touch("t", f"s{n}")
    assert len(live._expiry) <= 2 * 1024 + 1000  # about 1,000 live, plus one growth step


def test_store_failures_do_not_leak_the_store_address(free_port):
    """Issue 14: store addresses and Redis URLs reached gateway clients in error details."""
    from kvpool.errors import Unavailable
    from services.store.client import StoreClient

    port = free_port()  # nothing listens there
    with StoreClient(f"127.0.0.1:{port}", timeout_s=0.5, retries=0) as client:
        sessions = SessionStore(client)
        for call in (
            lambda: sessions.find("t", "s1"),
            lambda: sessions.delete("t", "s1"),
            lambda: sessions.save(Session("s1", "t", (1,), 1, 0.0, 0.0)),
        ):
            with pytest.raises(Unavailable) as err:
                call()
            assert str(port) not in str(err.value) and "127.0.0.1" not in str(err.value)
            assert "session store" in str(err.value)
