"""Tenant salts are secret by default (issue 23, section 2): `kvpool serve` as a newcomer runs it,
a real subprocess over a real redis-server, no secret given.

The salt was the tenant's plain name unless an operator knew to set a secret: anyone who knew a
tenant's name and a likely prompt computed its block keys, and whoever read Redis could tell
which tenant asked what.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.client import InferenceClient
from services.store.redis_process import RedisProcess
from workers.api import PromptInput
from workers.kv.hashing import Namespace, block_key, chain_hashes, tenant_salt
from workers.models import load_model
from workers.prompt import PromptEncoder

pytestmark = pytest.mark.integration

PROMPT = (
    "Quarterly planning notes for the storage team, kept private to this tenant: the cache "
    "tier moves to new hosts in May, and the budget for it is not yet approved. "
) * 6
TENANT = "acme"
BLOCK = 64  # kvpool serve's default block size


@pytest.fixture
def serve(free_port, tmp_path):
    """`serve(state_dir, redis_url)`: a started `kvpool serve` (process, target, its stderr)."""
    procs: list[subprocess.Popen] = []

    def start(state_dir: Path, redis_url: str):
        port, store_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
        env.pop("RAY_ADDRESS", None)
        argv = [sys.executable, "-m", "kvpool.cli", "serve", "--model", "tiny-random",
                "--workers", "2", "--redis", redis_url, "--state-dir", str(state_dir),
                "--port", str(port), "--store-port", str(store_port), "--worker-gpus", "0",
                "--grace", "5", "--log-level", "WARNING"]  # fmt: skip
        log_path = tmp_path / f"serve-{len(procs)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (the process's)
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"kvpool serve exited: {log_path.read_text()[-3000:]}")
                try:
                    reply = health.Check(  # our service, not any server that answers on the port
                        health_pb2.HealthCheckRequest(service="kvpool.v1.Inference"), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("kvpool serve did not come up in 240 s")
                time.sleep(0.5)
        return proc, target, log_path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0


@pytest.fixture(scope="module")
def model():
    loaded = load_model("tiny-random")
    return loaded, PromptEncoder.for_model(loaded).encode_input(PromptInput(prompt=PROMPT))


def keys(model, salt: str) -> list[str]:
    loaded, tokens = model
    namespace = Namespace(loaded.fingerprint, "int8", BLOCK, salt)
    return [block_key(h) for h in chain_hashes(namespace, tokens)]


def wait_for_keys(db: redis.Redis, wanted: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while db.exists(*wanted) < len(wanted):
        if time.monotonic() > deadline:
            raise AssertionError("the prompt's blocks never reached Redis")
        time.sleep(0.2)


def test_kvpool_serve_keeps_a_secret_that_its_workers_share_across_restarts(serve, model, tmp_path):
    state = tmp_path / "state"
    with RedisProcess() as redis_server:
        db = redis.Redis.from_url(redis_server.url)
        proc, target, log = serve(state, redis_server.url)
        secret_file = state / "namespace-secret"
        assert (secret_file.stat().st_mode & 0o777) == 0o600
        assert log.read_text().count(str(secret_file)) == 1  # printed once, with its path
        secret = secret_file.read_bytes().strip()
        keyed = keys(model, tenant_salt(TENANT, secret))
        blocks = len(keyed)
        # Few enough blocks that a busy worker costs more than they save (router.Router).
        assert 2 <= blocks <= 4

        with InferenceClient(target, timeout_s=120) as client:
            # The first request keeps its worker busy; the same prompt then goes to the other
            # worker (cheaper than a busy one for a few blocks), which finds the blocks cached.
            busy = client.stream(prompt=PROMPT, max_new_tokens=400, tenant=TENANT)
            first = next(busy)
            assert first.token_ids
            wait_for_keys(db, keyed)
            second = client.generate(prompt=PROMPT, max_new_tokens=2, tenant=TENANT)
            finished = [reply for reply in busy][-1]
        assert second.usage["worker"] != finished.usage.worker  # two workers...
        assert second.usage["cached_tokens"] >= blocks * BLOCK  # ...sharing the prompt

        # Nothing in Redis can be found from the tenant's name: not the keys a name-derived
        # salt gives, not the name itself in any key or value.
        for salt in (TENANT, ""):
            assert db.exists(*keys(model, salt)) == 0
        everything = list(db.scan_iter(count=1000))
        assert everything and all(TENANT.encode() not in key for key in everything)
        assert all(TENANT.encode() not in (db.get(key) or b"") for key in everything)
        stop(proc)

        # A restart over the same Redis keeps the secret, so the cache carries over.
        proc, target, log = serve(state, redis_server.url)
        assert "kept from an earlier start" in log.read_text()
        assert secret_file.read_bytes().strip() == secret
        with InferenceClient(target, timeout_s=120) as client:
            warm = client.generate(prompt=PROMPT, max_new_tokens=2, tenant=TENANT)
        assert warm.usage["cached_tokens_by_tier"]["store"] >= blocks * BLOCK
        stop(proc)

        # Another deployment, with its own secret, shares nothing with this one.
        proc, target, _ = serve(tmp_path / "other-state", redis_server.url)
        other = (tmp_path / "other-state" / "namespace-secret").read_bytes().strip()
        assert other != secret
        with InferenceClient(target, timeout_s=120) as client:
            cold = client.generate(prompt=PROMPT, max_new_tokens=2, tenant=TENANT)
        assert cold.usage["cached_tokens"] == 0
        stop(proc)
