"""The actor's side of a vLLM worker without vLLM: the wire's records round-trip and refuse
junk, and `EngineLink` starts its engine process, routes its answers, and says why when the
process refuses, crashes, or goes away (a fake engine program, tests/workers/fake_vllm_engine.py).
"""

import socket
import sys

import msgpack
import pytest

from kvpool.errors import InvalidArgument, NotFound, Unavailable
from workers.api import WorkerConfig
from workers.vllm_link import GONE, EngineLink
from workers.vllm_wire import (
    Abort,
    Finished,
    Ping,
    Pong,
    Ready,
    Start,
    Submit,
    Tokens,
    WireError,
    decode,
    encode,
    receive,
)
from workers.vllm_worker import VLLMWorker

FAKE = "tests.workers.fake_vllm_engine"


def start(model: str = "ok") -> Start:
    return Start(model, "float32", 64, "fp32", 4, 1 << 20, namespace_secret=b"s" * 32)


@pytest.mark.parametrize(
    "record",
    [
        start(),
        Submit("r1", (1, 2, 3), 8, temperature=0.7, seed=2**62, cache_salt="acme"),
        Abort("r1"),
        Ping(3, flush=True),
        Ready("m", "vllm|x", "int8", 64, 8192, (2, 3), 49152, "cpu"),
        Tokens("r1", (5,)),
        Finished("r1", "eos", local_tokens=64, store_tokens=128, plan="fetch"),
        Pong(3, running=1, stored_blocks=9),
    ],
)
def test_records_round_trip_with_tuples_and_bytes_intact(record):
    frame = encode(record)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode(frame[4:]) == record


def test_junk_frames_are_wire_errors():
    with pytest.raises(WireError):
        decode(b"\xc1")  # not msgpack
    with pytest.raises(WireError, match="no fields"):
        decode(msgpack.packb({"t": "Abort", "request_id": "r", "extra": 1}))
    with pytest.raises(WireError):
        decode(msgpack.packb({"t": "Exec", "code": "rm -rf /"}))
    a, b = socket.socketpair()
    a.sendall((1 << 30).to_bytes(4, "big"))
    with pytest.raises(WireError, match="over the"):
        receive(b.makefile("rb"))


def link(model: str) -> EngineLink:
    return EngineLink(sys.executable, "t1", start(model), module=FAKE, exit_on_loss=False)


def test_a_request_streams_its_tokens_and_its_end_and_pings_answer():
    engine = link("ok")
    try:
        assert engine.ready.fingerprint == "fake|fp" and engine.ready.eos_token_ids == (2,)
        inbox = engine.open("r1")
        engine.send(Submit("r1", (10, 11, 12), 2))
        assert [inbox.get(timeout=10) for _ in range(3)] == [
            Tokens("r1", (10,)), Tokens("r1", (11,)), Finished("r1", "length", 1, 2),
        ]  # fmt: skip
        engine.close("r1", finished=True)
        assert engine.ping(timeout_s=10).running == 0
    finally:
        engine.stop()
    assert engine.process.returncode == 0  # the socket closed: it exited on its own


def test_a_cancel_aborts_a_running_request_and_one_not_begun_is_remembered():
    engine = link("ok")
    try:
        inbox = engine.open("slow")
        engine.send(Submit("slow", (7,), 100))
        assert engine.ping(timeout_s=10).running == 1
        engine.cancel("slow")
        assert inbox.get(timeout=10) == Finished("slow", "abort")
        engine.cancel("later")
        assert engine.take_cancel("later") and not engine.take_cancel("later")
        with pytest.raises(InvalidArgument, match="already running"):
            engine.open("slow")
    finally:
        engine.stop()


def test_an_engine_that_refuses_to_start_raises_its_error():
    with pytest.raises(InvalidArgument, match="did not start: no such model"):
        link("refuse")


def test_an_engine_that_crashes_at_start_is_unavailable_with_its_log():
    with pytest.raises(Unavailable, match="crashed on purpose"):
        link("crash")


def test_an_engine_that_dies_leaves_every_open_request_gone():
    engine = link("die-on-submit")
    try:
        inbox = engine.open("r1")
        engine.send(Submit("r1", (1,), 1))
        assert inbox.get(timeout=10) is GONE
        assert engine.process.wait(10) == 4
    finally:
        engine.stop()


def test_a_vllm_worker_without_vllms_python_or_with_the_test_model_says_what_to_do(tmp_path):
    missing = WorkerConfig(engine="vllm", vllm_python=str(tmp_path / "no-python"))
    with pytest.raises(NotFound, match="run `make vllm`, or give --vllm-python"):
        VLLMWorker(missing, "w")
    tiny = WorkerConfig(engine="vllm", model="tiny-random", vllm_python=sys.executable)
    with pytest.raises(InvalidArgument, match="the transformers engine's test model"):
        VLLMWorker(tiny, "w")
    with pytest.raises(ValueError, match="engine must be one of transformers, vllm"):
        WorkerConfig(engine="tgi")
