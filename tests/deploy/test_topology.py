"""The docker-compose topology, run as separate local processes on loopback.

redis-server (a cache: maxmemory, allkeys-lru, no persistence, a password) <- `kvpool store serve`
<- a Ray head (`ray start --head` on a port that is not 6379, offering no CPUs, as in compose)
joined by two Ray worker nodes (`ray start --address`, one CPU slot each) <- `kvpool gateway
serve` joined to that cluster with two CPU workers. A client workload shares a long prefix; the
test checks that a prefix one worker computed is served to a worker on the other node from the
store. Everything is driven through the CLI contract (`kvpool ... serve`, `kvpool generate
--json`) and the Ray CLI, like the containers do.

Ray runs with its own temp dir and token auth (a random token), every port chosen free, so no
other Ray session on this machine is touched; teardown kills exactly the processes started here
and their descendants (no `ray stop`, which would stop every Ray on the machine).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.redis import RedisProcess, free_port, require_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
KVPOOL = [sys.executable, "-m", "kvpool.cli"]
BLOCK_TOKENS = 16
# About 300 tokens: well past a dozen blocks, and under the load penalty the gateway below is
# given (1024 tokens per request in flight), so concurrent requests spread over both workers.
SHARED_PREFIX = (
    "You are the support assistant of a company that sells solar panels, inverters and home "
    "batteries. Answer in two sentences at most, quote the warranty terms when they apply, and "
    "never promise delivery dates. Warranty terms: panels carry a 25-year performance warranty "
    "and a 12-year product warranty; inverters carry 10 years; batteries carry 10 years or 6000 "
    "cycles, whichever comes first. Returns are accepted within 30 days of delivery if the "
    "product is unused and in its original packaging. Installation must be done by a certified "
    "installer, otherwise the product warranty is void. Support hours are 8:00 to 18:00 on "
    "weekdays. Escalate any report of smoke, sparks or a burning smell to the safety team at "
    "once and tell the customer to switch off the installation at the main breaker. "
) * 2


class Stack:
    """The processes of one topology, each with a log file, stopped in reverse order."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **env},
            start_new_session=True,  # its own process group, so a stray signal stays ours
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def alive(self, proc: subprocess.Popen[bytes], name: str) -> None:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        # Ray's daemons (GCS, raylets, the actors' worker processes) are descendants of the
        # `ray start --block` processes; collect them all before anything is signalled.
        family: list[psutil.Process] = []
        for _, proc in self.procs:
            with suppress(psutil.NoSuchProcess):
                family += psutil.Process(proc.pid).children(recursive=True)
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for child in family:
            with suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(family, timeout=10)


def wait_for(condition, timeout_s: float, what: str, check=lambda: None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check()
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def node_ports() -> list[str]:
    """Every port a Ray node binds, chosen free: several nodes share this host."""
    names = (
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    )
    return [f"{name}={free_port()}" for name in names]


CLUSTER_PROBE = """
import json, ray
from ray._private import state
ray.init(log_to_driver=False)
nodes = [
    {"id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"]}
    for n in ray.nodes() if n["Alive"]
]
actors = [
    {"name": a["Name"], "node": a["Address"]["NodeID"], "class": a["ActorClassName"]}
    for a in state.actors(actor_state_name="ALIVE").values()
]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def cluster_state(stack: Stack, gcs_port: int) -> dict[str, Any]:
    """Alive nodes and actors, read from the GCS by a short-lived driver."""
    proc = subprocess.run(
        [sys.executable, "-c", CLUSTER_PROBE],
        env={**stack.env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextmanager
def topology(tmp_path: Path) -> Iterator[dict[str, Any]]:
    require_redis_server()
    ray_temp = Path(tempfile.mkdtemp(prefix="kvt-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVPOOL_", "RAY_"))}
    env |= {
        "RAY_AUTH_MODE": "token",  # as in compose; a private token, never ~/.ray/auth_token
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # One secret for every gateway of the deployment, as compose and the chart give them.
        "KVPOOL_NAMESPACE_SECRET": secrets.token_hex(32),
    }
    if "KVPOOL_CACHE_DIR" in os.environ:
        env["KVPOOL_CACHE_DIR"] = os.environ["KVPOOL_CACHE_DIR"]
    stack = Stack(tmp_path, env)
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, ray_temp, ignore_errors=True)
        cleanup.callback(stack.stop)

        password = secrets.token_hex(12)
        redis = RedisProcess(password=password, maxmemory_bytes=256 << 20, policy="allkeys-lru")
        cleanup.callback(redis.close)
        redis.start()

        store_port = free_port()
        store = stack.start(
            "store",
            [
                *KVPOOL,
                "store",
                "serve",
                "--backend",
                f"redis://127.0.0.1:{redis.port}/0",
                "--host",
                "127.0.0.1",
                "--port",
                str(store_port),
                "--metrics-port",
                str(free_port()),
                "--grace",
                "2",
            ],
            KVPOOL_REDIS_PASSWORD=password,
        )
        wait_for(lambda: serving(store_port), 60, "the store", lambda: stack.alive(store, "store"))

        gcs_port = free_port()
        assert gcs_port != 6379
        head = stack.start(
            "ray-head",
            [
                *RAY,
                "start",
                "--head",
                f"--port={gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=0",
                "--num-gpus=0",
                f"--temp-dir={ray_temp}",
                f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                "--object-store-memory=100000000",
                "--disable-usage-stats",
                "--block",
                *node_ports(),
            ],
        )
        wait_for(
            lambda: port_open(gcs_port), 120, "Ray's GCS", lambda: stack.alive(head, "ray-head")
        )

        for i in range(2):  # one after the other: nodes on one host race for socket names
            worker = stack.start(
                f"ray-worker-{i}",
                [
                    *RAY,
                    "start",
                    f"--address=127.0.0.1:{gcs_port}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    "--object-store-memory=100000000",
                    "--disable-usage-stats",
                    "--block",
                    *node_ports(),
                ],
            )
            wait_for(
                lambda n=i + 2: len(cluster_state(stack, gcs_port)["nodes"]) >= n,
                180,
                f"Ray worker node {i} to join",
                lambda w=worker, n=f"ray-worker-{i}": stack.alive(w, n),
            )

        gateway_port = free_port()
        gateway = stack.start(
            "gateway",
            [
                *KVPOOL,
                "gateway",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(gateway_port),
                "--store",
                f"127.0.0.1:{store_port}",
                "--workers",
                "2",
                "--worker-gpus",
                "0",
                "--worker-cpus",
                "1",
                "--model",
                "tiny-random",
                "--codec",
                "int8",
                "--block-tokens",
                str(BLOCK_TOKENS),
                # A full batch (8) costs 8192 prefix tokens, so each request in flight costs
                # 1024: more than the shared prefix, so overlapping requests spread.
                "--route-load-penalty-tokens",
                "8192",
                "--metrics-port",
                str(free_port()),
                "--grace",
                "5",
            ],
            RAY_ADDRESS=f"127.0.0.1:{gcs_port}",
        )
        wait_for(
            lambda: serving(gateway_port),
            420,
            "the gateway and its two workers",
            lambda: stack.alive(gateway, "gateway"),
        )
        yield {"stack": stack, "gateway": f"127.0.0.1:{gateway_port}", "gcs_port": gcs_port}


def generate_many(stack: Stack, target: str, prompts: list[str]) -> list[dict[str, Any]]:
    """Run one `kvpool generate --json` process per prompt, all at once."""
    procs = [
        subprocess.Popen(
            [*KVPOOL, "generate", "--target", target, prompt, "--json", "--max-new-tokens", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=stack.env,
        )
        for prompt in prompts
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"kvpool generate failed ({proc.returncode}): {err[-2000:]}"
        results.append(json.loads(out))
    return results


def test_blocks_computed_on_one_node_are_reused_on_another(tmp_path):
    with topology(tmp_path) as topo:
        stack, target = topo["stack"], topo["gateway"]

        # Where the gateway put its workers: two actors, two different non-head nodes.
        state = cluster_state(stack, topo["gcs_port"])
        head = {n["id"] for n in state["nodes"] if n["head"]}
        worker_nodes = {a["node"] for a in state["actors"]} - head
        assert len(worker_nodes) == 2, f"worker actors are not on two worker nodes: {state}"

        def node_of(worker: str) -> str:
            [node] = [a["node"] for a in state["actors"] if a["name"].endswith(worker)]
            return node

        first_prompt = SHARED_PREFIX + "Question 0: can I return it?"
        [first] = generate_many(stack, target, [first_prompt])
        writer = first["usage"]["worker"]
        assert first["usage"]["prompt_tokens"] > 10 * BLOCK_TOKENS

        # Concurrent requests spread over both workers (the load penalty outweighs the cached
        # prefix); the other worker finds the prefix in the store, not in its own L1.
        served: list[dict[str, Any]] = []
        for round_no in range(6):
            prompts = [
                SHARED_PREFIX + f"Question {round_no}-{i}: is the battery covered?"
                for i in range(3)
            ]
            *others, again = generate_many(stack, target, [*prompts, first_prompt])
            # Greedy decoding from a cache rebuilt out of stored blocks gives the same text.
            assert again["text"] == first["text"], (again["usage"], first["usage"])
            served += [*others, again]
            reused = [
                r
                for r in served
                if r["usage"]["worker"] != writer
                and r["usage"]["cached_tokens_by_tier"]["store"] >= BLOCK_TOKENS
            ]
            if reused:
                break
        workers = {r["usage"]["worker"] for r in [first, *served]}
        assert len(workers) == 2, f"every request went to {workers}"
        assert reused, [r["usage"] for r in served]
        reader = reused[0]["usage"]["worker"]
        assert node_of(reader) != node_of(writer), "the reuse did not cross Ray nodes"
        # Cached tokens never exceed the full blocks of the prompt.
        for r in [first, *served]:
            usage = r["usage"]
            assert usage["cached_tokens"] <= usage["prompt_tokens"] // BLOCK_TOKENS * BLOCK_TOKENS
