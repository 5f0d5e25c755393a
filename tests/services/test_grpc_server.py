"""services.grpc_server: health, graceful stop, bind errors, bearer tokens."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool.errors import Unavailable
from services.auth import TokenTable
from services.grpc_server import GrpcServer, ServiceSpec

pytestmark = pytest.mark.integration


def _slow(request: bytes, context) -> bytes:
    time.sleep(0.5)
    return b"done:" + request


def _register(server: grpc.Server) -> None:
    handlers = {"Slow": grpc.unary_unary_rpc_method_handler(_slow)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Slow", handlers),))


def test_stop_goes_not_serving_and_lets_in_flight_calls_finish():
    server = GrpcServer([ServiceSpec("t.Slow", _register)])
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    statuses: list[int] = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    def follow() -> None:
        try:
            for reply in watch:
                statuses.append(reply.status)
        except grpc.RpcError:
            pass  # the stream ends when the server stops

    follower = threading.Thread(target=follow)
    follower.start()
    in_flight = channel.unary_unary("/t.Slow/Slow").future(b"x", timeout=10)
    time.sleep(0.1)  # the call is running on the server
    stopped_at = time.monotonic()
    server.stop(grace_s=5)
    assert in_flight.result() == b"done:x"  # finished, not cancelled
    # Neither the in-flight call nor the open Watch stream holds stop() for the grace period.
    assert time.monotonic() - stopped_at < 3
    follower.join(5)
    assert not follower.is_alive()
    SERVING, NOT_SERVING = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert statuses[:1] == [SERVING] and NOT_SERVING in statuses
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/t.Slow/Slow")(b"y", timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    assert server.wait(1)


def test_a_busy_port_is_a_clear_error():
    first = GrpcServer([ServiceSpec("t.Slow", _register)])
    first.start()
    try:
        second = GrpcServer([ServiceSpec("t.Slow", _register)], port=first.port)
        with pytest.raises(Unavailable, match=f"cannot listen on 127.0.0.1:{first.port}"):
            second.start()
    finally:
        first.stop(0)


def test_bearer_token_guards_calls_but_not_health():
    server = GrpcServer([ServiceSpec("t.Slow", _register)], auth=TokenTable({"abc": ""}))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            slow = channel.unary_unary("/t.Slow/Slow")
            with pytest.raises(grpc.RpcError) as err:
                slow(b"x", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert slow(b"x", timeout=5, metadata=(("authorization", "Bearer abc"),)) == b"done:x"
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="t.Slow"), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_callers_without_a_token_cannot_tell_real_methods_from_unknown_ones():
    """Issue 14: an unknown method answered UNIMPLEMENTED before the token was checked."""
    server = GrpcServer([ServiceSpec("t.Slow", _register)], auth=TokenTable({"abc": ""}))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for method in ("/t.Slow/Slow", "/t.Slow/Nope", "/no.Such/Service"):
                with pytest.raises(grpc.RpcError) as err:
                    channel.unary_unary(method)(b"x", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary("/t.Slow/Nope")(
                    b"x", timeout=5, metadata=(("authorization", "Bearer abc"),)
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
