"""The test harness's own Redis processes: a node whose port was taken after it was picked says
why it stopped, and a cluster starts anyway on fresh ports (the suite's processes pick free
ports all the time; one such race once failed a whole module's fixture)."""

import socket

import pytest

from services.store.redis_process import RedisProcess
from tests.support.redis import require_redis_server
from tests.support.redis_cluster import RedisClusterProcess, require_redis_cluster


def _occupy(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_redis_whose_port_is_taken_says_why_it_stopped():
    require_redis_server()
    process = RedisProcess()
    taken = _occupy(process.port)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited: .*Address already in use"):
            process.start()
    finally:
        taken.close()
        process.close()


def test_a_cluster_node_whose_port_is_taken_starts_on_another():
    require_redis_cluster()
    cluster = RedisClusterProcess(masters=3, replicas=0)
    first = cluster.nodes[0].port
    taken = _occupy(first)
    try:
        with cluster:
            assert cluster.nodes[0].port != first
            assert len(cluster.master_ports()) == 3
    finally:
        taken.close()
