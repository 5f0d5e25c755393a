"""free_port() picks from below the kernel's ephemeral range: a port the kernel hands to another
process's bind to port 0 (Ray's GCS, raylet and agents while `kvpool serve` starts) is never one
a test picked and has not bound yet."""

import socket
from pathlib import Path

from services.store.redis_process import free_port


def test_free_ports_are_bindable_and_outside_what_the_kernel_hands_out():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(20000 <= port < low for port in ports), ports
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_returned():
    held = []
    try:
        for _ in range(30):
            sock = socket.socket()
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            held.append(sock)
        taken = {s.getsockname()[1] for s in held}
        assert all(free_port() not in taken for _ in range(200))
    finally:
        for sock in held:
            sock.close()
