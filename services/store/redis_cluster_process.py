"""A throwaway Redis Cluster of redis-server child processes, for tests and the store benchmark.

`masters` masters with `replicas` replicas each, every node a `RedisProcess` (127.0.0.1 only, no
persistence, its own temporary folder) started with `--cluster-enabled yes`, then joined with
`redis-cli --cluster create ... --cluster-yes`. `start()` returns once every node reports
`cluster_state:ok`. `kill_master()` SIGKILLs a master and `wait_promoted()` waits until its
replica has taken its slots over, which is how the tests simulate a failing shard.

The node timeout is short (1 s by default, against Redis's 15 s) so a failover takes about two
seconds, and `cluster-require-full-coverage no` lets the other shards keep serving meanwhile, as
docs/store.md recommends for a cache.
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.store.redis_process import RedisProcess, free_port

_BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free and valid too."""
    while True:
        port = free_port()
        if port + _BUS_OFFSET <= 65535 and _bindable(port + _BUS_OFFSET):
            return port


def _command(port: int, *args: str, timeout_s: float = 2.0) -> str:
    """One inline command to the node on `port`; its reply as text ('' when unreachable)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            reply = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
                if reply[:1] != b"$":
                    if reply.endswith(b"\r\n"):
                        break
                    continue
                header, _, body = reply.partition(b"\r\n")
                if len(body) >= int(header[1:]) + 2:
                    break
            return reply.decode(errors="replace")
    except OSError:
        return ""


class RedisClusterProcess:
    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        maxmemory_bytes: int | None = None,
        tls_cert_key: tuple[Path, Path] | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli not found; install the redis-server package")
        self.redis_cli = cli
        self.masters = masters
        self.replicas = replicas
        cluster_args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # in the node's own temp dir
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            # Replicas sync at once (default: 5 s later); a replica that never synced
            # cannot take over from its master.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        # With a (certificate, key) pair clients, the cluster bus and replication speak TLS on
        # each node's TLS port (the plain port stays, for this class's own checks).
        self.tls_cert_key = tls_cert_key
        if tls_cert_key:
            cluster_args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            cluster_args += ["--tls-ca-cert-file", str(tls_cert_key[0])]
        self.nodes = [
            RedisProcess(
                cluster_port(),
                maxmemory_bytes=maxmemory_bytes,
                tls_cert_key=tls_cert_key,
                extra_args=cluster_args,
            )
            for _ in range(masters * (1 + replicas))
        ]
        for node in self.nodes:
            if tls_cert_key:
                node.tls_port = cluster_port()  # its bus port (+10000) must be valid too

    def _client_port(self, node: RedisProcess) -> int:
        return node.tls_port if self.tls_cert_key and node.tls_port else node.port

    @property
    def url(self) -> str:
        """`redis+cluster://` with the first `masters` nodes as seeds (any node would do).

        With TLS: `rediss+cluster://...?ssl_ca_certs=CERT`, trusting the test certificate.
        """
        nodes = self.nodes[: self.masters]
        seeds = ",".join(f"127.0.0.1:{self._client_port(node)}" for node in nodes)
        if self.tls_cert_key:
            return f"rediss+cluster://{seeds}?ssl_ca_certs={self.tls_cert_key[0]}"
        return f"redis+cluster://{seeds}"

    def start(self, timeout_s: float = 30.0) -> "RedisClusterProcess":
        try:
            for node in self.nodes:
                self._start_node(node)
            addresses = [f"127.0.0.1:{self._client_port(node)}" for node in self.nodes]
            replicas = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            tls = ["--tls", "--cacert", str(self.tls_cert_key[0])] if self.tls_cert_key else []
            subprocess.run(
                [self.redis_cli, *tls, "--cluster", "create", *addresses, *replicas],
                check=True,
                capture_output=True,
                timeout=timeout_s,
            )
            self.wait_ok(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _start_node(self, node: RedisProcess, attempts: int = 3) -> None:
        """Start one node; if it exits at once (a port, or its bus port, taken since it was
        picked: other processes pick free ports too), try again on fresh ports."""
        for attempt in range(attempts):
            try:
                node.start()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                node.port = cluster_port()
                if self.tls_cert_key:
                    node.tls_port = cluster_port()

    def _running(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.running]

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and sees `masters` masters."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._ok(node.port) for node in self._running()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ok after {timeout_s} s")
            time.sleep(0.05)

    def _ok(self, port: int) -> bool:
        info = _command(port, "CLUSTER", "INFO")
        if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
            return False
        masters = self.master_ports(port)
        if len(masters) != self.masters:
            return False
        if port not in masters:
            return True
        # A master is ready once its replicas have synced (so they can take over).
        replication = _command(port, "INFO", "replication")
        return replication.count("state=online") >= min(self.replicas, self._spare_nodes())

    def _spare_nodes(self) -> int:
        """Replicas a master can have now: fewer once nodes have been killed."""
        return (len(self._running()) - self.masters) // self.masters

    def master_ports(self, via: int | None = None) -> list[int]:
        """Ports of the masters that hold slots, as the node on `via` sees them."""
        port = via or self._running()[0].port
        ports = []
        for line in _command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def kill_master(self, index: int = 0) -> int:
        """SIGKILL the `index`-th master (by port); returns its port."""
        port = self.master_ports()[index]
        next(node for node in self.nodes if node.port == port).kill()
        return port

    def wait_promoted(self, dead_port: int, timeout_s: float = 30.0) -> None:
        """Until a replica has taken over the slots of the master that was on `dead_port`."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self._running()
            views = [self.master_ports(node.port) for node in alive]
            if all(dead_port not in view and len(view) == self.masters for view in views):
                self.wait_ok(max(0.1, deadline - time.monotonic()))
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no replica took over from the master on port {dead_port}")
            time.sleep(0.05)

    def flushall(self) -> None:
        for port in self.master_ports():
            _command(port, "FLUSHALL")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "RedisClusterProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
