"""uvicorn serving the HTTP API on a thread of the gateway process, next to the gRPC server.

    server = HttpServer(app, host="0.0.0.0", port=8000, grace_s=30,
                        connections=PeerConnections(max_per_peer=32, max_total=4096))
    port = server.start()      # bound and accepting when it returns
    server.begin_stop()        # stop accepting; open responses go on
    server.stop(grace_s=30)    # open streams get `grace_s` to finish, then are cancelled

The socket is bound here, before uvicorn starts, so a port in use is a clear `Unavailable`
rather than a log line from a thread. With TLS the gRPC server's certificate and key serve here
too; uvicorn reads certificates only from files, so they pass through a private temp directory
that is removed as soon as they are loaded.
"""

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from kvpool.errors import Unavailable
from services.auth import ServerTls
from services.gateway.http.connections import PeerConnections, guarded_protocol

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        grace_s: float,
        tls: ServerTls | None = None,
        connections: PeerConnections | None = None,
        header_timeout_s: float = 10.0,
        keepalive_s: float = 5.0,
    ) -> None:
        self._host, self._port = host.strip("[]"), port  # "[::]" as gRPC spells it
        self._tls = tls
        self.connections = connections or PeerConnections(max_per_peer=0, max_total=0)
        self._config = uvicorn.Config(
            app,
            # Connections are bounded per peer and headers have a deadline (http.connections);
            # no cap on requests in flight, which idle connections could fill for everyone.
            http=guarded_protocol(self.connections, header_timeout_s),
            lifespan="off",
            log_config=None,  # the process's logging, not uvicorn's own
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
            timeout_keep_alive=max(1, math.ceil(keepalive_s)),
            ssl_context_factory=self._ssl_context if tls is not None else None,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        return self._port

    def start(self, timeout_s: float = 30.0) -> int:
        """Bind, start serving; returns the bound port."""
        self._socket = _bind(self._host, self._port)
        self._port = self._socket.getsockname()[1]
        self._config.load()  # here, so a bad certificate raises in the caller's thread
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[self._socket])),  # type: ignore[list-item]
            name="http-api",
            daemon=True,
        )
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > timeout_s:
                raise Unavailable(f"the HTTP API did not start on {self._host}:{self._port}")
            self._thread.join(0.02)
            waited += 0.02
        log.info("serving the OpenAI-compatible HTTP API on port %d", self._port)
        return self._port

    def begin_stop(self) -> None:
        """Stop accepting connections; responses in flight go on (see `stop`)."""
        self._server.should_exit = True

    def stop(self, grace_s: float) -> None:
        """Stop, letting open responses run up to `grace_s` (then they are cancelled)."""
        self.begin_stop()
        if self._thread is None:
            return
        self._thread.join(grace_s + 5.0)  # uvicorn's own grace, plus the cancelled ones' cleanup
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)

    def _ssl_context(
        self, _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        tls = self._tls
        if tls is None:  # not installed without TLS; here for the type checker
            raise RuntimeError("no TLS settings")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="kvpool-tls-") as folder:
            cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert.write_bytes(tls.cert_chain)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(tls.private_key)
            context.load_cert_chain(cert, key)
        return context


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise Unavailable(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # "::" serves IPv4 too, as gRPC's does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock
