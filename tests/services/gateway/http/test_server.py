"""`HttpServer`: uvicorn on a thread, bound before it starts, stopped gracefully (no Ray needed)."""

import socket
import threading

import anyio
import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from kvpool.errors import Unavailable
from services.gateway.http.server import HttpServer

release = threading.Event()


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def slow(request: Request) -> StreamingResponse:
    async def body():
        yield b"first\n"
        await anyio.to_thread.run_sync(release.wait, 30)
        yield b"last\n"

    return StreamingResponse(body())


APP = Starlette(routes=[Route("/hello", hello), Route("/slow", slow)])


def test_serves_on_a_free_port_and_stops():
    server = HttpServer(APP, host="127.0.0.1", port=0, grace_s=5)
    port = server.start()
    assert port > 0 and server.port == port
    assert httpx.get(f"http://127.0.0.1:{port}/hello", timeout=5).text == "hello"
    server.stop(5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/hello", timeout=5)


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(APP, host="127.0.0.1", port=port, grace_s=1)
        with pytest.raises(Unavailable, match=f"cannot listen on 127.0.0.1:{port}"):
            server.start()


def test_stop_lets_an_open_response_finish_within_the_grace():
    release.clear()
    server = HttpServer(APP, host="127.0.0.1", port=0, grace_s=20)
    port = server.start()
    with httpx.stream("GET", f"http://127.0.0.1:{port}/slow", timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines) == "first"
        stopper = threading.Thread(target=server.stop, args=(20,))
        stopper.start()
        stopper.join(1.0)
        assert stopper.is_alive()  # waiting for the open response, not cutting it
        release.set()
        assert next(lines) == "last"
    stopper.join(20)
    assert not stopper.is_alive()
