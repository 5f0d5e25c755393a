"""A session that is really gone says so (issue 23, section 4): NOT_FOUND over gRPC, 404 over
HTTP, naming the session, never a new conversation that silently dropped the history."""

import uuid

import httpx2 as httpx
import pytest

from kvpool.errors import NotFound

pytestmark = pytest.mark.integration


def lose(stack, session_id: str, tenant: str = "") -> None:
    """Remove the session's record from the store, as an eviction or a flushed Redis would."""
    key = stack.core.sessions.key(tenant, session_id)
    assert stack.store.delete([key]) == 1


def test_a_session_gone_from_the_store_is_not_found_not_new(stack, client):
    """Other tenants' traffic evicted a session's key: the next turn answered 200 with its
    history gone (prompt_tokens 156 -> 2)."""
    session = f"lost-{uuid.uuid4().hex[:8]}"
    first = client.generate(prompt="Remember the number 7.", max_new_tokens=2, session_id=session)
    assert first.usage["session_saved"] is True
    lose(stack, session)
    with pytest.raises(NotFound) as err:
        client.generate(prompt="Which number?", max_new_tokens=2, session_id=session)
    assert session in str(err.value) and "lost" in str(err.value)
    # Deleting it lets the id start anew, on purpose this time.
    client.delete_session(session)
    again = client.generate(prompt="A new start.", max_new_tokens=2, session_id=session)
    assert client.get_session(session).turns == 1
    assert again.usage["prompt_tokens"] < first.usage["prompt_tokens"] + 8


def test_over_http_a_lost_session_is_404_naming_it(stack):
    session = f"lost-http-{uuid.uuid4().hex[:8]}"
    body = {
        "model": stack.pool.info.model,
        "messages": [{"role": "user", "content": "Remember the number 7."}],
        "max_tokens": 2,
        "kvpool": {"session_id": session},
    }
    url = f"http://127.0.0.1:{stack.http_port}/v1/chat/completions"
    first = httpx.post(url, json=body, timeout=60)
    assert first.status_code == 200 and first.json()["kvpool"]["session_saved"] is True
    lose(stack, session)
    body["messages"] = [{"role": "user", "content": "Which number?"}]
    reply = httpx.post(url, json=body, timeout=60)
    assert reply.status_code == 404, reply.text
    assert session in reply.json()["error"]["message"]


def test_a_session_this_gateway_never_saw_still_starts_anew(client):
    """The witness is what this gateway saved: an unknown id is a new conversation."""
    session = f"fresh-{uuid.uuid4().hex[:8]}"
    done = client.generate(prompt="Hello.", max_new_tokens=2, session_id=session)
    assert done.usage["session_saved"] is True
    assert client.get_session(session).turns == 1
