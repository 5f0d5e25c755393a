"""Connections that send nothing, or trickle their headers, cost their peer only (issue 23,
section 4): real sockets against the HTTP API over the package's workers.

The attacker's sockets come from 127.0.0.2 and the honest client's from 127.0.0.3: Linux routes
all of 127.0.0.0/8 to loopback, so they are two peers to the server, as two machines would be.
"""

import contextlib
import socket
import threading
import time

import httpx2 as httpx
import pytest

from services.auth import parse_token_file
from services.gateway.core import InferenceCore
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import GatewaySettings, caller_quota, http_server

pytestmark = pytest.mark.integration

ATTACKER, HONEST = "127.0.0.2", "127.0.0.3"
TOKENS = """
token-mallory-0000000000000000000000 mallory
token-alice-000000000000000000000000 alice
"""


@pytest.fixture
def front(stack):
    """`front(**settings)`: an HTTP front of its own over the stack's workers; its port."""
    started = []

    def start(**settings):
        config = GatewaySettings(store_target="unused", port=0, http_port=0, grace_s=1, **settings)
        core = InferenceCore(stack.pool, stack.core.sessions, GatewayMetrics())
        server = http_server(
            config, core, stack.pool.info.model, lambda: True, caller_quota(config)
        )
        server.start()
        started.append(server)
        return server.port

    yield start
    for server in started:
        server.stop(1)


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answer(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sent before it closed the connection (b"" when it sent nothing)."""
    sock.settimeout(timeout_s)
    parts = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            parts.append(chunk)
    return b"".join(parts)


def honest(port: int, token: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(local_address=HONEST)
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30, headers=headers
    )


def test_idle_and_trickling_connections_do_not_block_health_or_requests(stack):
    """Issue 23: 260 connections that send nothing, or trickle partial headers, filled uvicorn's
    connection cap; every real request and /health then got 503 while the sockets stayed open.
    Against the package's gateway, which has the default limits."""
    port = stack.http_port
    held: list[socket.socket] = []
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for byte in b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 10_000:
                if stop.wait(0.2):
                    return
                sock.send(bytes([byte]))

    try:
        for _ in range(240):
            held.append(connect(port, ATTACKER))
        for _ in range(20):
            sock = connect(port, ATTACKER)
            held.append(sock)
            threading.Thread(target=trickle, args=(sock,), daemon=True).start()
        time.sleep(0.5)
        with honest(port) as client:
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            reply = client.post(
                "/v1/completions",
                json={
                    "model": stack.pool.info.model,
                    "prompt": "An ordinary request.",
                    "max_tokens": 2,
                },
            )
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - started < 10
        # The attacker's connections past its share were answered 503 and closed at once.
        refused = [answer(s, 2) for s in held[32:40]]
        assert all(b"--max-connections-per-peer=32" in r for r in refused), refused
    finally:
        stop.set()
        for sock in held:
            sock.close()


def test_refused_connections_name_the_limit(front):
    port = front(max_connections_per_peer=2)
    first, second = connect(port, ATTACKER), connect(port, ATTACKER)
    try:
        third = connect(port, ATTACKER)
        reply = answer(third, 5)
        assert reply.startswith(b"HTTP/1.1 503")
        assert (
            b"127.0.0.2 already has 2 connections open (limit --max-connections-per-peer=2)"
            in reply
        )
        third.close()
        with honest(port) as client:  # another peer is not counted with it
            assert client.get("/health").status_code == 200
    finally:
        first.close()
        second.close()


def test_headers_trickled_past_the_deadline_get_408_and_a_closed_connection(front):
    port = front(http_header_timeout_s=1.0)
    sock = connect(port, ATTACKER)
    started = time.monotonic()
    try:
        for byte in b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 40:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # closed by the server
            time.sleep(0.1)
            if time.monotonic() - started > 6:
                break
        reply = answer(sock, 5)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"--http-header-timeout" in reply
    assert time.monotonic() - started < 6


def test_a_connection_that_sends_nothing_is_closed_after_the_header_deadline(front):
    port = front(http_header_timeout_s=1.0)
    sock = connect(port, ATTACKER)
    started = time.monotonic()
    try:
        reply = answer(sock, 10)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408")
    assert 0.9 < time.monotonic() - started < 5


def test_an_idle_keep_alive_connection_is_closed(front):
    port = front(http_keepalive_s=1.0)
    sock = connect(port, ATTACKER)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        started = time.monotonic()
        reply = answer(sock, 10)
    finally:
        sock.close()
    assert b"200 OK" in reply and b'"ok"' in reply
    assert time.monotonic() - started < 5  # closed by the server, not by our timeout


def test_a_body_that_never_arrives_is_408_and_frees_the_tenants_call(stack, front):
    port = front(request_timeout_s=1.0, max_calls_per_tenant=1, auth=parse_token_file(TOKENS))
    sock = connect(port, ATTACKER)
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer token-mallory-0000000000000000000000\r\n"
            b"content-length: 100\r\n\r\n{"
        )
        reply = answer(sock, 10)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"--request-timeout" in reply
    with honest(port, "token-mallory-0000000000000000000000") as client:  # her one call is free
        body = {"model": stack.pool.info.model, "prompt": "again", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 200


def test_a_lower_case_bearer_scheme_is_accepted(stack, front):
    """Issue 23: `bearer` in lower case was refused, though the scheme is case-insensitive."""
    port = front(auth=parse_token_file(TOKENS))
    with honest(port) as client:
        body = {"model": stack.pool.info.model, "prompt": "hi", "max_tokens": 1}
        headers = {"authorization": "bearer token-alice-000000000000000000000000"}
        reply = client.post("/v1/completions", json=body, headers=headers)
    assert reply.status_code == 200, reply.text
