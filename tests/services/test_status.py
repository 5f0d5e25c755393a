"""services.status: exceptions -> status codes on a real server, and back on the client."""

import time

import grpc
import pytest

from kvpool import errors
from services.grpc_server import GrpcServer, ServiceSpec
from services.status import ErrorInterceptor, code_for, error_from_rpc

pytestmark = pytest.mark.integration

RAISES = {
    "InvalidArgument": errors.InvalidArgument("bad key: keys are ..."),
    "NotFound": errors.NotFound("no session s1"),
    "ResourceExhausted": errors.ResourceExhausted("the limit is 10"),
    "Unavailable": errors.Unavailable("Redis down"),
    "DataLoss": errors.DataLoss("checksum"),
    "Unauthenticated": errors.Unauthenticated("token"),
    "ValueError": ValueError("caller mistake"),
    "RuntimeError": RuntimeError("secret internals"),
}


def _raise(request: bytes, context):
    raise RAISES[request.decode()]


def _stream(request: bytes, context):
    yield b"first"
    raise RAISES[request.decode()]


def _slow(request: bytes, context):
    time.sleep(1)
    return b"late"


def _strict_parse(data: bytes) -> bytes:
    if data.startswith(b"bad"):
        raise ValueError("not a message")
    return data


def _count(requests, context):
    return str(sum(1 for _ in requests)).encode()


def _handlers(server: grpc.Server) -> None:
    handlers = {
        "Raise": grpc.unary_unary_rpc_method_handler(_raise),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Parse": grpc.unary_unary_rpc_method_handler(_slow, request_deserializer=_strict_parse),
        "Count": grpc.stream_unary_rpc_method_handler(_count, request_deserializer=_strict_parse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Faulty", handlers),))


@pytest.fixture
def faulty():
    calls: list[tuple[str, grpc.StatusCode]] = []
    interceptor = ErrorInterceptor(lambda method, code, seconds: calls.append((method, code)))
    server = GrpcServer([ServiceSpec("t.Faulty", _handlers)], interceptors=[interceptor])
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel, calls
    channel.close()
    server.stop(0)


EXPECTED = {
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DataLoss": grpc.StatusCode.DATA_LOSS,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "ValueError": grpc.StatusCode.INVALID_ARGUMENT,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_error_maps_to_its_code_with_its_message_both_ways(faulty, name):
    channel, calls = faulty
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/t.Faulty/Raise")(name.encode(), timeout=5)
    assert err.value.code() == EXPECTED[name]
    assert err.value.details() == str(RAISES[name])
    assert calls == [("/t.Faulty/Raise", EXPECTED[name])]
    back = error_from_rpc(err.value, "t.Raise")
    if name != "ValueError":
        assert type(back) is type(RAISES[name])
    assert str(RAISES[name]) in str(back)


def test_a_bug_is_internal_without_its_details(faulty):
    channel, calls = faulty
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/t.Faulty/Raise")(b"RuntimeError", timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details()
    assert calls == [("/t.Faulty/Raise", grpc.StatusCode.INTERNAL)]
    assert type(error_from_rpc(err.value, "x")) is errors.KvpoolError


def test_errors_in_the_middle_of_a_stream(faulty):
    channel, calls = faulty
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for message in channel.unary_stream("/t.Faulty/Stream")(b"Unavailable", timeout=5):
            received.append(message)
    assert received == [b"first"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert calls == [("/t.Faulty/Stream", grpc.StatusCode.UNAVAILABLE)]


def test_a_missed_deadline_is_unavailable_to_the_caller(faulty):
    channel, _ = faulty
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/t.Faulty/Slow")(b"", timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(error_from_rpc(err.value, "slow"), errors.Unavailable)


def test_code_for_unknown_exceptions_is_none():
    assert code_for(KeyError("x")) is None
    assert code_for(errors.InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_requests_are_invalid_argument_not_internal(faulty):
    channel, calls = faulty
    for method, request in (("Parse", b"bad"), ("Count", iter([b"ok", b"bad bytes"]))):
        call = getattr(channel, "unary_unary" if method == "Parse" else "stream_unary")
        with pytest.raises(grpc.RpcError) as err:
            call(f"/t.Faulty/{method}")(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message: not a message" in err.value.details()
    assert [code for _, code in calls] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert channel.stream_unary("/t.Faulty/Count")(iter([b"a", b"b"]), timeout=5) == b"2"
