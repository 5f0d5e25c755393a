"""Fuzzing request parsing on the gateway: random and malformed requests through a real gRPC
server (a tiny-random worker behind it), and random protos through the servicer's conversions.

Every call must end OK or with a status that names the caller's mistake (INVALID_ARGUMENT,
NOT_FOUND, RESOURCE_EXHAUSTED), never INTERNAL, UNKNOWN or UNAVAILABLE; and afterwards the server
is still SERVING with its worker alive and answering. Examples are bounded, and the sampling
strategies only let small `max_new_tokens` through, so a run takes seconds.
"""

import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvpool.errors import InvalidArgument
from kvpool.v1 import inference_pb2 as pb
from kvpool.v1 import inference_pb2_grpc
from services.gateway.servicer import prompt_input, sampling_params

pytestmark = pytest.mark.integration

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SERVICE = "/kvpool.v1.Inference/"
CALL_DEADLINE_S = 60.0
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

text = st.text(max_size=60)
nonblank = st.text(min_size=1, max_size=60).filter(str.strip)

# Each field has a valid strategy and a hostile one. A request is all valid, valid but for one
# field, or hostile throughout, so that both the generation path and every check get exercised.
VALID = {
    "session_id": st.sampled_from(["", "", "s-1", "s-2"]),
    "tenant": st.sampled_from(["", "acme"]) | st.text(max_size=20),
    "prompt": nonblank,
    "token_ids": st.lists(st.integers(0, 49151), min_size=1, max_size=40),
    "messages": st.lists(
        st.builds(pb.ChatMessage, role=st.sampled_from(["user", "assistant"]), content=text),
        min_size=1,
        max_size=4,
    ),
    "max_new_tokens": st.sampled_from([None, 1, 2, 3]),
    "temperature": st.sampled_from([None, 0.0, 0.5, 1.0, 2.0]),
    "top_k": st.sampled_from([None, 0, 1, 5, 2**31 - 1]),
    "top_p": st.sampled_from([None, 1.0, 0.9, 1e-6]),
    "seed": st.none() | st.integers(0, 2**63 - 1),
    "stop": st.lists(nonblank, max_size=2),
}
HOSTILE = {
    "session_id": st.sampled_from(["bad id", "x" * 129, "é", "../s-1"]) | text,
    "tenant": st.sampled_from(["x" * 1100]) | st.text(max_size=20),
    "prompt": text,
    "token_ids": st.lists(
        st.integers(0, 49151) | st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=40
    ),
    "messages": st.lists(
        st.builds(
            pb.ChatMessage,
            role=st.sampled_from(["system", "user", "assistant", "", "tool", "USER"]) | text,
            content=text,
        ),
        max_size=4,
    ),
    # Small or invalid only: a valid large value would just spend CPU generating noise.
    "max_new_tokens": st.sampled_from([0, -1, -(2**31), 2**31 - 1, 4096, 4097]),
    "temperature": st.floats(width=32),
    "top_k": st.integers(-(2**31), 2**31 - 1),
    "top_p": st.floats(width=32),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.sampled_from(["", "\n", "the"]) | text, max_size=3),
}
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


INPUT_KINDS = ("prompt", "messages", "token_ids")


def _set_input(draw: st.DrawFn, request, field, mode: str) -> None:
    """Fill the input oneof (hostile requests may leave it empty)."""
    kind = draw(st.sampled_from([*INPUT_KINDS, "none"] if mode == "hostile" else INPUT_KINDS))
    if kind == "prompt":
        request.prompt = draw(field("prompt"))
    elif kind == "messages":
        request.messages.CopyFrom(pb.ChatMessages(messages=draw(field("messages"))))
    elif kind == "token_ids":
        request.token_ids.CopyFrom(pb.TokenIds(ids=draw(field("token_ids"))))


def _fields(draw: st.DrawFn):
    """A field -> strategy function for one request: all valid, one hostile, or all hostile."""
    mode = draw(st.sampled_from(["valid", "one", "one", "hostile"]))
    bad = draw(st.sampled_from(sorted(VALID))) if mode == "one" else None

    def field(name: str) -> st.SearchStrategy:
        return HOSTILE[name] if mode == "hostile" or name == bad else VALID[name]

    return field, mode


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    field, mode = _fields(draw)
    request = pb.GenerateRequest(session_id=draw(field("session_id")), tenant=draw(field("tenant")))
    _set_input(draw, request, field, mode)
    sampling = request.sampling
    sampling.max_new_tokens = 2  # absent would mean 64 tokens; set it unless drawn below
    for name in SAMPLING_FIELDS:
        value = draw(field(name))
        if value is not None:
            setattr(sampling, name, value)
        elif name == "max_new_tokens" and mode == "hostile":
            sampling.ClearField(name)
    sampling.stop.extend(draw(field("stop")))
    return request


@st.composite
def prefill_requests(draw: st.DrawFn) -> pb.PrefillRequest:
    field, mode = _fields(draw)
    request = pb.PrefillRequest(tenant=draw(field("tenant")))
    _set_input(draw, request, field, mode)
    return request


def status_of(stream) -> grpc.StatusCode:
    """Drain a streaming call; its final status code."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.target) as ch:
        yield ch


def check(code: grpc.StatusCode, request: object) -> None:
    event(code.name)  # `pytest --hypothesis-show-statistics` shows how many got through
    assert code in ALLOWED, f"{code.name} for {request!r}"


@settings(max_examples=150, **FUZZ)
@given(request=generate_requests())
def test_generate_requests_get_ok_or_a_client_error(channel, request) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    check(status_of(stub.Generate(request, timeout=CALL_DEADLINE_S)), request)


@settings(max_examples=60, **FUZZ)
@given(
    method=st.sampled_from(["Prefill", "GetSession", "DeleteSession"]),
    prefill=prefill_requests(),
    session_id=VALID["session_id"] | HOSTILE["session_id"],
    tenant=VALID["tenant"] | HOSTILE["tenant"],
)
def test_other_methods_get_ok_or_a_client_error(channel, method, prefill, session_id, tenant):
    stub = inference_pb2_grpc.InferenceStub(channel)
    if method == "Prefill":
        request = prefill
    else:
        message = pb.GetSessionRequest if method == "GetSession" else pb.DeleteSessionRequest
        request = message(session_id=session_id, tenant=tenant)
    try:
        getattr(stub, method)(request, timeout=CALL_DEADLINE_S)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
    check(code, request)


@settings(max_examples=60, **FUZZ)
@given(
    method=st.sampled_from(["Generate", "Prefill", "GetSession", "DeleteSession"]),
    payload=st.binary(max_size=120)
    | st.sampled_from(
        [
            b"\x0a\x02\xff\xfe",  # prompt field holding invalid UTF-8
            b"\x1a\x03\x08\x80\x80",  # token_ids with a truncated varint
            b"\x22\x02\x08\x00",  # sampling.max_new_tokens = 0
            b"\x0a",  # a tag with no value
            b"\xff\xff\xff\xff\x0f",  # an invalid tag
        ]
    ),
)
def test_undecodable_bytes_are_invalid_argument_not_internal(channel, method, payload) -> None:
    """The bytes on the wire, as a broken or hostile client could send them."""
    if method == "Generate":
        call = channel.unary_stream(SERVICE + method)(payload, timeout=CALL_DEADLINE_S)
        code = status_of(call)
    else:
        try:
            channel.unary_unary(SERVICE + method)(payload, timeout=CALL_DEADLINE_S)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
    check(code, payload)


@settings(max_examples=400, **FUZZ)
@given(request=generate_requests(), raw=st.binary(max_size=80))
def test_servicer_conversions_raise_only_invalid_argument(request, raw) -> None:
    """The conversion functions alone, at many more examples than the network allows."""
    try:
        parsed = pb.GenerateRequest.FromString(raw)
    except Exception:  # protobuf's DecodeError; the server answers INVALID_ARGUMENT for it
        parsed = pb.GenerateRequest()
    for candidate in (request, parsed):
        with contextlib.suppress(InvalidArgument):
            prompt_input(candidate)
        with contextlib.suppress(InvalidArgument):
            sampling_params(candidate.sampling)


def test_the_server_survived_the_fuzzing(gateway, channel) -> None:
    """Runs after the fuzz tests above (file order): still serving, the worker never died."""
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="kvpool.v1.Inference"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert gateway.pool.deaths == 0 and len(gateway.pool.live()) == 1
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = pb.GenerateRequest(prompt="still here?", sampling=pb.SamplingParams(max_new_tokens=3))
    final = list(stub.Generate(request, timeout=CALL_DEADLINE_S))[-1]
    assert final.usage.completion_tokens == 3
