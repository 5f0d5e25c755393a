"""The one assembler (services/stack.py): what it starts it stops, in reverse, even on errors.

The full stack (store, Ray, workers, gateway) is exercised by every integration fixture, which
starts it with `local_stack`; these tests pin the undo path, which those fixtures only see when
all goes well.
"""

import socket

import pytest
import ray

from services.stack import Stack
from services.store.client import StoreClient
from services.store.server import StoreConfig

pytestmark = pytest.mark.integration


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_an_error_inside_the_stack_still_stops_ray_and_the_store():
    with pytest.raises(RuntimeError, match="boom"), Stack() as stack:
        port = stack.start_store(StoreConfig(port=0, grace_s=0))
        assert stack.store_target == f"127.0.0.1:{port}"
        with StoreClient(stack.store_target) as client:
            assert client.stats() is not None  # the store answers while the stack runs
        stack.start_ray(1, private=True)
        assert ray.is_initialized()
        raise RuntimeError("boom")
    assert not ray.is_initialized()
    assert _refused(port)
    with pytest.raises(RuntimeError, match="no store"):
        _ = stack.store_target


def test_a_stack_without_a_gateway_says_so():
    with Stack() as stack, pytest.raises(RuntimeError, match="gateway is not started"):
        stack.client()


def test_a_local_ray_that_times_out_at_startup_is_started_once_more(monkeypatch):
    """Ray gives a new node a fixed 30 s to register; on a loaded CI box that passed once."""
    import ray

    from services.stack import start_local_ray

    calls, shutdowns = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    start_local_ray(num_cpus=2)
    assert calls == [{"num_cpus": 2}, {"num_cpus": 2}] and shutdowns == [1]

    def broken(**kwargs):
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ValueError, match="num_cpus"):  # other errors are not retried
        start_local_ray(num_cpus=-1)
