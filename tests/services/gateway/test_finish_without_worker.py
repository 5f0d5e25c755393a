"""A worker that dies after its last token but before its summary: the stream is already whole,
so the gateway finishes it itself instead of failing it over (and repeating tokens).

The shared stack's real workers generate; a pool in front of them drops each stream's WorkDone
and raises WorkerLost in its place, as the pool does when the actor dies at that moment.
"""

import pytest

from services.gateway.api import Delta, Finished, GenerateCall
from services.gateway.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.pool import WorkerLost
from workers.api import PromptInput, SamplingParams, WorkDone

pytestmark = pytest.mark.integration


class _LosesTheSummary:
    """The real pool, whose streams lose their WorkDone to a dead worker."""

    def __init__(self, pool) -> None:
        self._pool = pool
        self.streams = 0

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def stream(self, *args, **kwargs):
        self.streams += 1
        for item in self._pool.stream(*args, **kwargs):
            if isinstance(item, WorkDone):
                raise WorkerLost("the worker died before its summary")
            yield item


def _run(core: InferenceCore, params: SamplingParams) -> tuple[list[int], Finished]:
    call = GenerateCall(PromptInput(prompt="The summary was lost: "), params)
    items = list(core.generate(call))
    tokens = [t for item in items if isinstance(item, Delta) for t in item.token_ids]
    finished = items[-1]
    assert isinstance(finished, Finished)
    return tokens, finished


def test_a_stream_whose_summary_is_lost_finishes_at_its_length(stack):
    params = SamplingParams(max_new_tokens=6)
    whole, normal = _run(stack.core, params)
    assert normal.finish_reason == "length" and len(whole) == 6
    pool = _LosesTheSummary(stack.pool)
    core = InferenceCore(pool, stack.core.sessions, GatewayMetrics())
    tokens, finished = _run(core, params)
    assert finished.finish_reason == "length"
    assert tokens == whole  # every token once: nothing repeated by a failover
    assert pool.streams == 1  # finished without a second worker
    assert finished.usage.work.completion_tokens == 6
    assert finished.usage.work.prompt_tokens == normal.usage.work.prompt_tokens
