"""A generation that ran is not thrown away because its session could not be saved (issue 23,
section 4): the KVStore hangs (SIGSTOP) between a session turn's start and its end."""

import uuid

import pytest

from services.gateway.client import usage_dict
from tests.faults.support import gateway_metrics, metric, stopped, wait_for

pytestmark = pytest.mark.integration


def test_a_turn_whose_session_cannot_be_saved_still_returns_its_output(stack):
    """With Redis stopped, session requests failed with 503 after their generation had run."""
    client = stack.client
    session = f"unsaved-{uuid.uuid4().hex[:8]}"
    client.generate(prompt="The first turn.", max_new_tokens=2, session_id=session)

    stream = client.stream(prompt=" Then a second.", max_new_tokens=12, session_id=session)
    tokens = list(next(stream).token_ids)  # the session was read: the turn is running
    with stopped(stack.store.pid):  # the store hangs before the turn is saved
        rest = list(stream)
    tokens += [t for reply in rest for t in reply.token_ids]
    usage = usage_dict(rest[-1].usage)
    assert rest[-1].finish_reason  # the stream ended as a finished generation, not an error
    assert usage["completion_tokens"] == len(tokens) == 12
    assert usage["session_saved"] is False  # and says its turn is not in the session
    assert metric(gateway_metrics(stack.gateway), "kvpool_gateway_session_save_failures_total") == 1

    # The session keeps its earlier turn; the client may send the unsaved one again.
    def first_turn_only() -> bool:
        try:
            return client.get_session(session).turns == 1
        except Exception:
            return False  # the store's breaker, just after the outage

    wait_for(first_turn_only, 30, "the session to be readable again")
    again = client.generate(prompt=" Then a second.", max_new_tokens=2, session_id=session)
    assert again.usage["session_saved"] is True
    assert client.get_session(session).turns == 2
