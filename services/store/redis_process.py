"""A throwaway redis-server child process, for tests and the store benchmark.

It listens on 127.0.0.1 only, with persistence off (`--save '' --appendonly no`) and its working
directory in a temporary folder, so it leaves nothing behind and never touches port 6379.
`restart()` brings it back on the same port, which is how the tests simulate a Redis outage.
"""

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Ray's worker processes listen on 10002-19999 by default; the kernel hands out its ephemeral
# range (32768-60999 on Linux) to every bind to port 0.
_LOWEST_PORT = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from below the kernel's ephemeral range.

    The port is closed again before its user binds it. A port the kernel picked for us is one it
    may hand to any other process's bind to port 0 meanwhile: Ray's GCS, raylet and agents bind
    that way while `kvpool serve` starts, and once one took the gateway's port, so a test's health
    check reached Ray's server and its Generate got UNIMPLEMENTED. The kernel never hands out a
    port from below its ephemeral range, so only another caller of this function could take it.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LOWEST_PORT, low) if low > _LOWEST_PORT + 100 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): try another
            return sock.getsockname()[1]
    raise OSError(f"no free port found in {_LOWEST_PORT}-{low - 1} on 127.0.0.1")


class RedisProcess:
    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        maxmemory_bytes: int | None = None,
        policy: str = "allkeys-lru",
        tls_cert_key: tuple[Path, Path] | None = None,
        executable: str = "redis-server",
        extra_args: Sequence[str] = (),
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise FileNotFoundError(f"{executable} not found; install the redis-server package")
        self.executable = path
        self.port = port or free_port()
        self.password = password
        self.maxmemory_bytes = maxmemory_bytes
        self.policy = policy
        # With a (certificate, key) pair, TLS is served on `tls_port` (the plain port stays).
        self.tls_cert_key = tls_cert_key
        self.tls_port = free_port() if tls_cert_key else None
        self.extra_args = tuple(extra_args)  # e.g. the cluster settings (redis_cluster_process)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="kvpool-redis-"))
        log = self._dir / "redis.log"  # redis-server reports why it stopped here, not on stderr
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self._dir)]
        args += ["--logfile", str(log)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls_cert_key:
            cert, key = self.tls_cert_key
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(cert)]
            args += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
        if self.maxmemory_bytes:
            args += ["--maxmemory", str(self.maxmemory_bytes), "--maxmemory-policy", self.policy]
        args += self.extra_args
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                if log.exists():
                    err += "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                raise RuntimeError(f"redis-server on port {self.port} exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                # +PONG, or -NOAUTH when a password is set: either way it is serving.
                return sock.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the process (the data goes with it: there is no persistence)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash (its temp dir stays until close)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def restart(self) -> "RedisProcess":
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "RedisProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def settled_block_keys(url: str, at_least: int = 1, timeout_s: float = 120.0) -> set[bytes]:
    """The block keys in the Redis at `url` once a write-behind has put them all.

    Settled means at least `at_least` keys and the same count five polls (a second) in a row;
    raises TimeoutError with the last count when that does not happen within `timeout_s`."""
    import redis  # the tests' and benchmarks' client; the store itself uses services.store

    client = redis.Redis.from_url(url)
    try:
        deadline, last, same = time.monotonic() + timeout_s, -1, 0
        while time.monotonic() < deadline:
            keys = set(client.scan_iter(match="kvpool:blk:*", count=1000))
            same = same + 1 if len(keys) == last else 0
            if len(keys) >= at_least and same >= 5:
                return keys
            last = len(keys)
            time.sleep(0.2)
    finally:
        client.close()
    raise TimeoutError(f"{last} block keys, wanted at least {at_least} and a stable count")
