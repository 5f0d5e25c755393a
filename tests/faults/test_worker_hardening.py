"""Issue 14, the workers' side: one request, or load, must not take workers down.

Each test runs against the fault stack (redis-server, `kvpool store serve`, a local Ray with two
tiny-random workers, the gateway) and changes the gateway's settings for its own duration only.
"""

import contextlib
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import ray
from ray.exceptions import RayActorError

from kvpool.errors import InvalidArgument, ResourceExhausted
from services.gateway.client import InferenceClient
from services.gateway.core import GatewayConfig
from tests.faults.conftest import BLOCK_TOKENS
from tests.faults.support import wait_for
from workers.api import SamplingParams, WorkRequest

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def gateway_config(stack, **changes):
    core = stack.gateway.core
    original = core.config
    core.config = replace(original, **changes)
    try:
        yield
    finally:
        core.config = original


@contextlib.contextmanager
def router_config(stack, **changes):
    router = stack.gateway.pool.router
    original = router.config
    router.config = replace(original, **changes)
    try:
        yield
    finally:
        router.config = original


@contextlib.contextmanager
def calls_per_caller(stack, limit: int):
    """This one client may hold `limit` calls (--max-calls-per-tenant) for the block."""
    quota = stack.gateway.quota
    original = quota.per_caller
    quota.per_caller = limit
    try:
        yield
    finally:
        quota.per_caller = original


def counts(stack) -> tuple[float, int, int]:
    """(failovers, worker deaths, replacements) so far."""
    failovers = stack.gateway.metrics.failovers._value.get()
    return failovers, stack.gateway.pool.deaths, stack.gateway.pool.replacements


def long_prompt(tokens: int) -> list[int]:
    return [100 + (i * 7919) % 20000 for i in range(tokens)]


# --- item 1: a bounded cache does not lift the prompt limit; prefill has its own deadline -------


def test_the_prompt_limit_defaults_to_a_number_and_holds_for_bounded_requests(stack):
    assert GatewayConfig().max_prompt_tokens > 0  # the default is a limit, not "none"
    limit = stack.gateway.core.config.max_prompt_tokens
    before = counts(stack)
    with pytest.raises(InvalidArgument, match=f"--max-prompt-tokens={limit}"):
        stack.client.generate(
            token_ids=long_prompt(limit + 1), max_new_tokens=1, max_cache_tokens=4 * BLOCK_TOKENS
        )
    assert counts(stack) == before
    # 0 means the model's context, for bounded requests too: never unlimited.
    context = stack.gateway.pool.info.max_context
    with (
        gateway_config(stack, max_prompt_tokens=0),
        pytest.raises(InvalidArgument, match=f"model's context of {context} tokens"),
    ):
        stack.client.generate(
            token_ids=long_prompt(context + 1),
            max_new_tokens=1,
            max_cache_tokens=4 * BLOCK_TOKENS,
        )


def test_a_prefill_past_its_deadline_fails_alone_and_no_worker_is_lost(stack):
    """A bounded request whose prefill outlasts --prefill-timeout: RESOURCE_EXHAUSTED, not
    retried on another worker, no worker killed; the worker stops the prefill early."""
    before = counts(stack)
    timeouts = stack.gateway.metrics.limit_rejections.labels("prefill_timeout")
    timeouts_before = timeouts._value.get()
    live = set(stack.gateway.pool.live())
    prompt = long_prompt(6000)  # several seconds of chunked prefill on tiny-random
    with gateway_config(stack, prefill_timeout_s=0.5, max_prompt_tokens=8192):
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match=r"--prefill-timeout=0\.5"):
            stack.client.generate(
                token_ids=prompt, max_new_tokens=4, max_cache_tokens=4 * BLOCK_TOKENS
            )
        assert time.monotonic() - started < 30
    assert counts(stack) == before  # no failover, no death, no replacement
    assert timeouts._value.get() == timeouts_before + 1  # the worker's PrefillTimeout, or ours
    assert set(stack.gateway.pool.live()) == live
    # The worker gave the request up between chunks: it is free again, and answers.
    wait_for(lambda: all(s.in_flight == 0 for s in stack.gateway.pool.stats(10)), 60, "idle")
    done = stack.client.generate(prompt="still serving", max_new_tokens=2)
    assert done.usage["completion_tokens"] == 2


def test_the_prefill_rpc_has_a_deadline(stack):
    before = counts(stack)
    with (
        gateway_config(stack, prefill_timeout_s=0.1),
        pytest.raises(ResourceExhausted, match="--prefill-timeout"),
    ):
        stack.client.prefill(token_ids=long_prompt(4000))
    assert counts(stack) == before


# --- item 2: busy workers are not dead ----------------------------------------------------------


def test_three_times_a_workers_capacity_of_streams_completes_with_no_worker_lost(stack):
    """Three times as many streams as the workers have threads: before issue 14 the streams
    past a worker's 8 threads waited in Ray's queue, that wait counted toward --token-timeout,
    and busy workers were killed as dead. Now they wait at the gateway (the per-worker cap is
    below the actor's threads) and the token timeout starts when a worker takes the request up,
    so a short --token-timeout kills nobody."""
    workers = len(stack.gateway.pool.live())
    threads = stack.gateway.settings.pool.resources.max_concurrency
    assert stack.gateway.pool.router.config.max_in_flight < threads  # the default cap is below
    n = 3 * threads * workers
    before = counts(stack)
    with (
        gateway_config(stack, token_timeout_s=3.0),
        router_config(stack, max_queued=n, queue_timeout_s=600),
        calls_per_caller(stack, n),  # one client plays the crowd: above its own default cap
        InferenceClient(stack.gateway.target, timeout_s=600) as client,
    ):
        prompts = [f"stream {i} of the crowd" for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            done = list(pool.map(lambda p: client.generate(prompt=p, max_new_tokens=60), prompts))
    assert [d.usage["completion_tokens"] for d in done] == [60] * n
    assert all(d.usage["failovers"] == 0 for d in done)
    assert counts(stack) == before


def test_the_queue_is_bounded(stack):
    with (
        router_config(stack, max_in_flight=1, max_queued=0),
        InferenceClient(stack.gateway.target, timeout_s=120) as client,
    ):
        streams = []
        try:
            for n in range(len(stack.gateway.pool.live())):
                stream = client.stream(prompt=f"busy {n}", max_new_tokens=400)
                next(stream)
                streams.append(stream)
            with pytest.raises(ResourceExhausted, match="--max-queued-requests=0"):
                client.generate(prompt="one too many", max_new_tokens=1)
        finally:
            for stream in streams:
                stream.close()


def test_control_calls_answer_while_every_generation_thread_is_busy(stack):
    wid, handle = next(iter(stack.gateway.pool.live().items()))
    stack.gateway.pool.router.set_draining(wid)  # the gateway sends it nothing meanwhile
    threads = stack.gateway.settings.pool.resources.max_concurrency
    params = SamplingParams(max_new_tokens=2000)
    requests = [
        WorkRequest(token_ids=(1, 2, 3), params=params, request_id=f"busy-{i}")
        for i in range(threads)
    ]
    refs = [handle.generate.options(num_returns="streaming").remote(r) for r in requests]
    try:
        for gen in refs:  # every thread has taken its request up
            ray.get(next(gen), timeout=60)
        # Every stats call answers within 5 s (GetTimeoutError otherwise), threads all busy.
        wait_for(
            lambda: ray.get(handle.stats.remote(), timeout=5).in_flight == threads, 60, "all busy"
        )
        assert ray.get(handle.ping.remote(), timeout=5) == wid
    finally:
        for r in requests:
            handle.cancel.remote(r.request_id)
        stack.gateway.pool.router.set_draining(wid, False)
    wait_for(lambda: ray.get(handle.stats.remote(), timeout=5).in_flight == 0, 60, "cancelled")


# --- item 12: losing a worker does not leak its capacity --------------------------------------


def test_a_worker_marked_dead_is_killed_and_a_failed_replacement_is_retried(stack):
    pool = stack.gateway.pool
    workers = len(pool.live())
    wid, handle = next(iter(pool.live().items()))
    before = pool.replacements
    original = pool.config
    # Hold the CPU slot the lost worker frees, so the first replacement cannot be scheduled.
    blocker = ray.remote(num_cpus=1)(_Blocker).remote()
    pool.config = replace(original, start_timeout_s=3.0, replace_backoff_s=0.5)
    try:
        pool.mark_dead(wid)  # what an ActorUnavailableError from the worker leads to

        def killed() -> bool:  # Ray kills asynchronously: a ping sent at once may still land
            try:
                ray.get(handle.ping.remote(), timeout=5)
            except RayActorError:
                return True
            except ray.exceptions.GetTimeoutError:
                pass
            return False

        wait_for(killed, 60, "the worker marked dead to be killed")  # not left holding its slot
        assert ray.get(blocker.ready.remote(), timeout=60)
        time.sleep(5)  # past the first attempt's start timeout
        assert pool.replacements == before
    finally:
        ray.kill(blocker)
        # The next attempt may take its time to load the model.
        pool.config = replace(original, replace_backoff_s=0.5)
    try:
        wait_for(lambda: pool.replacements > before, 180, "a replacement")
    finally:
        pool.config = original
    wait_for(lambda: len(pool.live()) == workers, 60, "the pool back at full size")
    assert pool.replace_failures == 0


class _Blocker:
    def ready(self) -> bool:
        return True


# --- item 4: Prefill waits for its own blocks only -----------------------------------------------


def test_prefill_does_not_wait_for_other_requests_writes(stack):
    from tests.support.work import make_worker

    worker = make_worker(stack.store, "prefill-own", block_tokens=BLOCK_TOKENS)
    gate = threading.Event()
    encode = worker.writer._encode
    worker.writer._encode = lambda block, h: (gate.wait(60), encode(block, h))[1]
    try:
        # Another request's blocks, stuck in the write-behind queue.
        fresh = random.Random().randrange(10_000, 40_000)  # blocks no earlier test stored
        other = WorkRequest(
            token_ids=tuple(range(fresh, fresh + 4 * BLOCK_TOKENS)), params=SamplingParams(2)
        )
        list(worker.generate(other))
        assert worker.writer.stats().pending > 0
        gate_open = threading.Timer(20, gate.set)
        gate_open.start()
        worker.writer._encode = encode  # this call's own blocks encode at once
        started = time.monotonic()
        result = worker.prefill(list(range(fresh + 1, fresh + 1 + 3 * BLOCK_TOKENS)))
        elapsed = time.monotonic() - started
        assert result.stored_tokens == 3 * BLOCK_TOKENS
        assert elapsed < 15 and worker.writer.stats().pending > 0
    finally:
        gate.set()
        worker.close()


# --- item 3: stop strings are capped ------------------------------------------------------------


def test_stop_strings_are_capped_with_a_clear_invalid_argument(stack):
    config = stack.gateway.core.config
    most, longest = config.max_stop_strings, config.max_stop_chars
    assert (most, longest) == (16, 256)  # the defaults
    flood = [f"{i:08d}" + "x" * 32 for i in range(20_000)]  # the review's 0.27 s per token
    with pytest.raises(
        InvalidArgument, match=f"20000 stop strings exceed .* --max-stop-strings={most}"
    ):
        stack.client.generate(prompt="hello", max_new_tokens=2, stop=flood)
    with pytest.raises(InvalidArgument, match=f"--max-stop-chars={longest}"):
        stack.client.generate(prompt="hello", max_new_tokens=2, stop=["y" * (longest + 1)])
    allowed = [f"{i:02d}" + "\u2603" * (longest - 2) for i in range(most)]
    done = stack.client.generate(prompt="hello", max_new_tokens=8, stop=allowed)
    assert done.usage["completion_tokens"] == 8
