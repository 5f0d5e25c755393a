"""Issue 14, item 10, end to end: with the KVStore stopped by SIGSTOP (hung, not refused),
requests through the gateway still complete, as misses, with the no-cache output, and each pays
at most about one store deadline: the workers' breakers then turn store calls into misses."""

import time

import pytest

from tests.faults.support import stopped, wait_for

pytestmark = pytest.mark.integration

DOC = (
    "A store that hangs does not refuse connections: it accepts them and never answers, so "
    "every caller waits for its whole deadline unless something stops waiting for it. " * 2
)
STORE_TIMEOUT_S = 2.0  # the fixture's workers (tests/faults/conftest.py)


def test_requests_complete_as_misses_while_the_store_hangs(stack):
    client = stack.client
    reference = client.generate(prompt=DOC, max_new_tokens=6)
    stack.flush()
    started = time.monotonic()
    warm = client.generate(prompt=DOC, max_new_tokens=6)
    baseline = time.monotonic() - started
    assert warm.usage["cached_tokens_by_tier"]["store"] > 0

    took = []
    with stopped(stack.store.pid):  # every store process, under --processes N
        for _ in range(4):
            started = time.monotonic()
            done = client.generate(prompt=DOC, max_new_tokens=6)
            took.append(time.monotonic() - started)
            assert done.token_ids == reference.token_ids
            assert done.usage["cached_tokens_by_tier"]["store"] == 0
    # At most one store deadline per request (the lookup), never the retries' several; once a
    # worker's breaker is open, none.
    assert max(took) <= baseline + STORE_TIMEOUT_S + 3.0, (baseline, took)

    def hit() -> bool:
        done = client.generate(prompt=DOC, max_new_tokens=6)
        return done.usage["cached_tokens_by_tier"]["store"] > 0

    wait_for(hit, 30, "a store hit after SIGCONT", interval_s=0.5)
