import time

import pytest

from kvpool.errors import ResourceExhausted, Unavailable
from services.gateway.router import Route, Router, RouterConfig


def router(**kwargs) -> Router:
    r = Router(RouterConfig(block_tokens=64, **kwargs))
    for w in ("a", "b", "c"):
        r.add_worker(w)
    return r


def test_idle_cluster_spreads_requests_round_robin():
    r = router()
    chosen = []
    for _ in range(6):
        route = r.acquire([])
        chosen.append(route.worker_id)
        r.release(route)
    assert sorted(chosen[:3]) == ["a", "b", "c"] and chosen[3:] == chosen[:3]


def test_nothing_cached_goes_to_the_least_loaded_worker():
    r = router()
    busy = [r.acquire([]), r.acquire([])]  # a and b now have one each
    assert r.acquire([]).worker_id == "c"
    assert {x.worker_id for x in busy} == {"a", "b"}


def test_worker_holding_the_longest_prefix_wins():
    r = router()
    r.record("b", ["h1", "h2"])
    r.record("c", ["h1"])
    assert r.acquire(["h1", "h2", "h3"]).worker_id == "b"


def test_a_cached_prefix_is_worth_block_tokens_per_leading_block():
    # b holds two blocks (128 tokens) and runs one request; c holds one block (64) and is idle.
    # b's score is 128 - penalty against c's 64: b wins below a penalty of 64 and ties at it
    # (the tie goes to c, with fewer in flight), so b's prefix counts exactly 128 tokens.
    for penalty, expected in ((63, "b"), (64, "c")):
        r = router(load_penalty_tokens=penalty)
        r.record("b", ["h1", "h2"])
        r.record("c", ["h1"])
        r.acquire([], exclude=frozenset({"a", "c"}))  # b's one request
        assert r.acquire(["h1", "h2", "h3"]).worker_id == expected


def test_prefix_counts_leading_blocks_only():
    r = router()
    r.record("a", ["h2", "h3"])  # h1 was evicted from the record
    r.record("b", ["h1"])
    # Counting a's later hits would give it 128 tokens against b's 64.
    assert r.acquire(["h1", "h2", "h3"]).worker_id == "b"


def test_load_outweighs_a_short_cached_prefix_but_not_a_long_one():
    r = router(load_penalty_tokens=512)
    r.record("a", ["h1", "h2"])  # 128 tokens
    held = r.acquire(["h1", "h2"])
    assert held.worker_id == "a"
    # "a" is busy: 128 cached tokens - 512 < 0 for an idle worker holding nothing
    assert r.acquire(["h1", "h2"]).worker_id != "a"
    long_prefix = [f"h{i}" for i in range(20)]  # 1280 tokens
    r.record("a", long_prefix)
    assert r.acquire(long_prefix).worker_id == "a"  # 1280 - 512 beats 0


def test_with_a_batch_bound_load_counts_as_batch_occupancy():
    # max_in_flight=8: a request costs 512 / 8 = 64 tokens, so a worker one request into its
    # batch still wins with two cached blocks (128 - 64 > 0); without a bound it lost (above).
    r = router(load_penalty_tokens=512, max_in_flight=8)
    r.record("a", ["h1", "h2"])
    assert r.acquire(["h1", "h2"]).worker_id == "a"
    assert r.acquire(["h1", "h2"]).worker_id == "a"  # 128 - 64 still beats an idle worker
    assert r.acquire(["h1", "h2"]).worker_id != "a"  # 128 - 128 ties: fewer in flight wins
    # A half-full batch (4 of 8) costs 256 tokens: five cached blocks (320) beat it.
    for _ in range(2):
        r.acquire([], exclude=frozenset({"b", "c"}))
    assert r.in_flight("a") == 4
    r.record("a", [f"h{i}" for i in range(1, 6)])
    assert r.acquire([f"h{i}" for i in range(1, 6)]).worker_id == "a"
    assert r.acquire(["h1", "h2"]).worker_id != "a"  # 5 in flight: 128 - 320 < 0


def test_excluded_and_removed_workers_are_never_chosen():
    r = router()
    r.record("a", ["h1"])
    assert r.acquire(["h1"], exclude=frozenset({"a"})).worker_id != "a"
    r.remove_worker("a")
    assert all(r.acquire(["h1"]).worker_id != "a" for _ in range(4))


def test_no_worker_is_unavailable():
    r = Router()
    with pytest.raises(Unavailable, match="no live worker"):
        r.acquire([])


def test_record_is_bounded_per_worker():
    # a runs one request, which costs 32 tokens: a held block (64) still wins it the next one,
    # and a block it no longer holds leaves it below the idle workers.
    r = router(record_blocks=2, load_penalty_tokens=32)
    r.record("a", ["h1", "h2", "h3"])
    r.acquire([], exclude=frozenset({"b", "c"}))
    assert r.acquire(["h2", "h3"]).worker_id == "a"  # both still held: 128 - 32
    r.release(Route("a"))
    assert r.acquire(["h1"]).worker_id != "a"  # dropped, the oldest: 0 - 32


def test_release_frees_the_in_flight_count():
    r = router()
    route = r.acquire([])
    assert r.in_flight(route.worker_id) == 1
    r.release(route)
    assert r.in_flight(route.worker_id) == 0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="block_tokens"):
        RouterConfig(block_tokens=0)
    with pytest.raises(ValueError, match="load_penalty_tokens"):
        RouterConfig(load_penalty_tokens=-1)


def test_draining_workers_get_no_new_requests_unless_all_drain():
    r = router()
    r.record("a", ["h1", "h2"])
    r.set_draining("a")
    assert all(r.acquire(["h1", "h2"]).worker_id != "a" for _ in range(4))
    r.set_draining("b")
    r.set_draining("c")
    assert r.acquire(["h1", "h2"]).worker_id == "a"  # everyone drains: still serve
    r.set_draining("a", False)
    r.set_draining("b", False)
    r.set_draining("c", False)
    assert r.acquire(["h1", "h2"]).worker_id == "a"


def test_a_full_worker_is_skipped_even_when_it_holds_the_prefix():
    r = router(max_in_flight=1)
    r.record("a", ["h1", "h2"])
    first = r.acquire(["h1", "h2"])
    assert first.worker_id == "a"
    assert r.acquire(["h1", "h2"]).worker_id != "a"  # a is full: the prefix no longer counts


def test_every_worker_full_is_resource_exhausted_naming_the_limit():
    r = router(max_in_flight=2, max_queued=0)  # refused at once, not queued
    routes = [r.acquire([]) for _ in range(6)]
    with pytest.raises(ResourceExhausted, match="--max-requests-per-worker=2"):
        r.acquire([])
    r.release(routes[0])
    assert r.acquire([]).worker_id == routes[0].worker_id  # room again once one finishes


def test_a_request_past_the_cap_waits_for_a_release():
    import threading

    router = Router(RouterConfig(max_in_flight=1, max_queued=4, queue_timeout_s=30))
    router.add_worker("w")
    first = router.acquire([])
    got = []
    waiter = threading.Thread(target=lambda: got.append(router.acquire([])))
    waiter.start()
    deadline = time.monotonic() + 10
    while router.queued == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert router.queued == 1 and not got
    router.release(first)
    waiter.join(10)
    assert [r.worker_id for r in got] == ["w"] and router.queued == 0


def test_the_queue_is_bounded_in_length_and_in_time():
    router = Router(RouterConfig(max_in_flight=1, max_queued=0, queue_timeout_s=30))
    router.add_worker("w")
    router.acquire([])
    with pytest.raises(ResourceExhausted, match="--max-queued-requests=0"):
        router.acquire([])
    router.config = RouterConfig(max_in_flight=1, max_queued=2, queue_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"none freed up in 0\.2 s"):
        router.acquire([])
    assert 0.2 <= time.monotonic() - started < 5 and router.queued == 0


def test_the_router_and_the_gateway_share_one_default_per_setting():
    """Issue 22: RouterConfig said 512 where the gateway said 2048 (and tests used the 512)."""
    from services.gateway.settings import GatewaySettings

    router, gateway = RouterConfig(), GatewaySettings(store_target="127.0.0.1:1")
    assert gateway.pool.route_load_penalty_tokens == router.load_penalty_tokens == 2048
    assert gateway.pool.max_queued_requests == router.max_queued
    assert gateway.pool.queue_timeout_s == router.queue_timeout_s
    # What the pool builds its router with keeps those defaults.
    routing = gateway.pool.routing
    assert (routing.load_penalty_tokens, routing.max_queued, routing.queue_timeout_s) == (
        router.load_penalty_tokens,
        router.max_queued,
        router.queue_timeout_s,
    )


def test_the_pool_builds_its_router_from_its_config():
    """The workers' block size and L1 size the router; the batch bound is its per-worker cap."""
    from services.gateway.settings import PoolConfig
    from workers.api import WorkerConfig

    worker = WorkerConfig(block_tokens=16, l1_bytes=4 << 30, max_batch=4)
    routing = PoolConfig(worker=worker, route_load_penalty_tokens=100, queue_timeout_s=5).routing
    assert (routing.block_tokens, routing.load_penalty_tokens) == (16, 100)
    assert routing.record_blocks == (4 << 30) // (256 << 10)
    assert routing.max_in_flight == 4  # max_requests_per_worker 0: the worker's max_batch
    assert PoolConfig(worker=worker, max_requests_per_worker=2).routing.max_in_flight == 2
    assert routing.queue_timeout_s == 5
