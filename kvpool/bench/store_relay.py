"""A byte relay in front of Redis for `kvpool bench store`: what one more TCP hop costs.

The KVStore sits between a client and Redis, so a value crosses two connections where raw
redis-py's crosses one. `SpliceRelay` forwards a port to Redis and does nothing else (it
`os.splice`s bytes both ways, no parsing), so raw redis-py through it measures the hop alone:
the ceiling any store in the path could reach against the direct redis-py figure on this box.
"""

import contextlib
import os
import socket
import threading


def _pump(src: socket.socket, dst: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        while moved := os.splice(src.fileno(), write_end, 1 << 20):
            while moved:
                moved -= os.splice(read_end, dst.fileno(), moved)
    except OSError:
        pass  # either side closed
    finally:
        os.close(read_end)
        os.close(write_end)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class SpliceRelay:
    """Forward 127.0.0.1:`port` (a free one) to `host`:`target_port`, until `close`."""

    def __init__(self, host: str, target_port: int) -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="bench-relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks.append(sock)
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            sock.close()

    def __enter__(self) -> "SpliceRelay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
