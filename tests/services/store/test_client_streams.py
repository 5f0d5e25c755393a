"""StoreClient splits a large Get over several streams: order kept, checks kept, processes used.

Real StoreServers on loopback over a real redis-server; the two-process case uses
`StoreSupervisor` (real child processes sharing one port).
"""

import time

import pytest

from kvpool.errors import InvalidArgument
from services.store.client import StoreClient
from services.store.processes import StoreSupervisor
from services.store.server import StoreConfig, StoreServer

pytestmark = pytest.mark.integration


def key(i: int) -> str:
    return f"kvpool:blk:{i:064x}"


def _get_calls(server: StoreServer) -> float:
    return server.metrics.requests.labels("Get", "OK")._value.get()


def _get_calls_since(server: StoreServer, before: float, expected: int) -> float:
    """Get calls counted since `before`, once `expected` of them are (or 5 s passed).

    The last value can reach the client before its stream's status is counted on the
    server, so the count is read after a bounded wait, then compared exactly."""
    deadline = time.monotonic() + 5
    while _get_calls(server) - before < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _get_calls(server) - before


@pytest.fixture
def server(redis_server):
    with StoreServer(StoreConfig(backend=redis_server, port=0, grace_s=1)) as server:
        yield server


def test_a_large_get_is_split_and_comes_back_in_request_order(server):
    keys = [key(i) for i in range(40)]
    values = {k: f"value of {k}".encode() * (i + 1) for i, k in enumerate(keys)}
    with StoreClient(server.target, streams=4, min_keys_per_stream=4) as client:
        client.put_many([(k, v) for k, v in values.items() if k != keys[21]])
        asked = list(reversed(keys))  # any order: it is the caller's
        before = _get_calls(server)
        got = client.get_many(asked)
        assert _get_calls_since(server, before, 4) == 4  # four streams for one call
        assert list(got) == [k for k in asked if k != keys[21]]  # order kept, the miss absent
        assert all(got[k] == values[k] for k in got)
        before = _get_calls(server)
        assert list(client.get_many(keys[:7])) == keys[:7]  # small: one stream
        assert _get_calls_since(server, before, 1) == 1


def test_one_failing_slice_fails_the_whole_get_and_the_client_goes_on(server):
    keys = [key(i) for i in range(32)]
    with StoreClient(server.target, streams=4) as client:
        client.put_many([(k, b"v") for k in keys])
        with pytest.raises(InvalidArgument, match="invalid key"):
            client.get_many([*keys[:30], "not a key!", keys[30]])  # in the last slice only
        assert len(client.get_many(keys)) == 32


def test_get_iter_yields_every_key_in_request_order_as_the_slices_arrive(server):
    keys = [key(i) for i in range(40)]
    values = {k: f"value of {k}".encode() * (i + 1) for i, k in enumerate(keys)}
    with StoreClient(server.target, streams=4, min_keys_per_stream=4) as client:
        client.put_many([(k, v) for k, v in values.items() if k != keys[21]])
        asked = list(reversed(keys))
        before = _get_calls(server)
        got = list(client.get_iter(asked))
        assert _get_calls_since(server, before, 4) == 4  # split like get_many
        assert [k for k, _ in got] == asked  # every key, in the caller's order
        assert all(v == (None if k == keys[21] else values[k]) for k, v in got)  # the miss: None
        assert list(client.get_iter(keys[:3])) == [(k, values[k]) for k in keys[:3]]
        assert list(client.get_iter([])) == []


def test_get_iter_raises_at_the_first_key_of_a_failed_slice(server):
    keys = [key(i) for i in range(32)]
    with StoreClient(server.target, streams=4) as client:
        client.put_many([(k, b"v") for k in keys])
        stream = client.get_iter([*keys[:30], "not a key!", keys[30]])  # the last slice fails
        served = []
        with pytest.raises(InvalidArgument, match="invalid key"):
            for k, v in stream:
                served.append((k, v))
        assert served == [(k, b"v") for k in keys[:24]]  # the three good slices, in order
        assert len(list(client.get_iter(keys))) == 32  # and the client goes on


def test_slices_reach_both_store_processes(redis_server):
    config = StoreConfig(backend=redis_server, port=0, grace_s=1)
    keys = [key(i) for i in range(64)]
    with StoreSupervisor(config, 2) as supervisor:
        with StoreClient(supervisor.target, streams=16) as client:
            client.put_many([(k, b"v") for k in keys])
            assert len(client.get_many(keys)) == 64
        # Stats' counts are per process, so fresh connections see each process's own: the one
        # that took the Put (puts 64) and the other (puts 0), with their shares of the hits.
        processes = set()
        for _ in range(16):
            with StoreClient(supervisor.target) as fresh:
                stats = fresh.stats()
                processes.add((stats.puts, stats.hits))
    assert len(processes) == 2, processes
    assert {puts for puts, _ in processes} == {0, 64}
    assert sum(hits for _, hits in processes) == 64
    assert all(hits > 0 for _, hits in processes), processes


def test_stream_settings_are_checked():
    with pytest.raises(ValueError, match="streams must be 1 to 64"):
        StoreClient("127.0.0.1:1", streams=0)
    with pytest.raises(ValueError, match="min_keys_per_stream positive"):
        StoreClient("127.0.0.1:1", min_keys_per_stream=0)


def test_a_slice_with_a_broken_frame_is_data_loss_for_the_whole_get():
    """The split keeps the framing checks: a server that truncates one slice's value fails it.

    A hand-written Get handler on a real gRPC server (the client is the layer under test).
    """
    from concurrent import futures

    import grpc

    from kvpool.errors import DataLoss
    from kvpool.v1 import store_pb2
    from services.store.chunks import SERVICE_NAME, get_chunks
    from services.store.framing import Piece, encode_get_chunk

    def get(request, context):
        keys = list(request.keys)
        if "kvpool:bad" in keys:  # announces 5 bytes, sends 3
            yield encode_get_chunk(
                [Piece(b"abc", last=True, size=5, index=keys.index("kvpool:bad"))]
            )
            return
        yield from get_chunks(((i, k.encode()) for i, k in enumerate(keys)), 1 << 20)

    handler = grpc.unary_stream_rpc_method_handler(get, store_pb2.GetRequest.FromString, None)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Get": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        keys = [key(i) for i in range(16)]
        with StoreClient(f"127.0.0.1:{port}", streams=4, retries=0) as client:
            assert client.get_many(keys) == {k: k.encode() for k in keys}  # four good slices
            with pytest.raises(DataLoss, match="announced 5"):
                client.get_many([*keys[:14], "kvpool:bad", keys[14]])  # the last slice only
    finally:
        server.stop(0)
