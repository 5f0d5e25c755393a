"""Bounded sessions through the gateway: real gRPC, Ray worker actors, Redis behind the store."""

import msgpack
import pytest
import ray
from prometheus_client import generate_latest

from kvpool.errors import InvalidArgument
from services.gateway.sessions import Session, decode_session, encode_session
from tests.services.gateway.support import wait_for

TEXT = (
    "A long conversation should not need a longer and longer cache: the gateway bounds it with "
    "sinks and a recent window. "
) * 8


def test_a_bounded_session_keeps_its_bound_and_survives_its_worker(stack, client):
    first = client.generate(
        prompt=TEXT, max_new_tokens=30, session_id="bounded", max_cache_tokens=68, sink_tokens=4
    )
    assert first.usage["evicted_tokens"] > 0
    session = client.get_session("bounded")
    assert (session.max_cache_tokens, session.sink_tokens) == (68, 4)

    # The next turn names no bound: it keeps the session's.
    second = client.generate(prompt=" Go on.", max_new_tokens=20, session_id="bounded")
    assert second.usage["evicted_tokens"] > first.usage["evicted_tokens"]
    assert second.usage["cached_tokens"] > 0

    # Its worker dies; the third turn rebuilds sinks and window from the store on another one.
    served = second.usage["worker"]
    ray.kill(stack.pool.handle(served), no_restart=True)
    # (The router may still pick it, for its cache: the gateway then fails over.)
    third = client.generate(prompt=" And then?", max_new_tokens=20, session_id="bounded")
    assert third.usage["worker"] != served
    assert third.usage["cached_tokens_by_tier"]["store"] > 0
    assert third.usage["evicted_tokens"] > second.usage["evicted_tokens"]
    history = client.get_session("bounded").token_ids
    assert len(history) == third.usage["prompt_tokens"] + third.usage["completion_tokens"]
    metrics = generate_latest(stack.metrics.registry).decode()
    assert 'kvpool_gateway_bounded_requests_total{tenant=""} 3.0' in metrics
    evicted = sum(u.usage["evicted_tokens"] for u in (first, second, third))
    assert f'kvpool_gateway_evicted_tokens_total{{tenant=""}} {float(evicted)}' in metrics
    wait_for(lambda: len(stack.pool.live()) == 2, 180, "a replacement worker")


@pytest.mark.parametrize(
    ("bound", "message"),
    [
        ({"max_cache_tokens": 20}, "must be at least sink_tokens + 2 x block_tokens = 36"),
        ({"max_cache_tokens": 68, "sink_tokens": -1}, "sink_tokens must be 0 (no sinks)"),
        ({"max_cache_tokens": -5}, "max_cache_tokens must be 0 (unbounded) or positive"),
    ],
)
def test_a_bad_bound_is_invalid_argument_with_what_is_allowed(client, bound, message):
    # The client turns the status into the matching error: INVALID_ARGUMENT is InvalidArgument.
    with pytest.raises(InvalidArgument, match="INVALID_ARGUMENT") as caught:
        client.generate(prompt="hello", max_new_tokens=2, **bound)
    assert message in str(caught.value)


def test_sessions_stored_before_bounds_read_as_unbounded():
    session = Session("old", "", (1, 2, 3), turns=1, created_unix_s=1.0, updated_unix_s=2.0)
    secret = b"window-namespace-secret-0123456789"
    record = msgpack.unpackb(encode_session(session, secret))
    del record["window"]
    old = decode_session(msgpack.packb(record), tenant="", session_id="old", secret=secret)
    assert (old.max_cache_tokens, old.token_ids) == (0, (1, 2, 3))
