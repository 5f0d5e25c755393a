"""docker-compose.yml and its CPU override, checked offline (no Docker engine needed).

The files validate against the Compose specification's JSON Schema (`../shared/schemas`), and the
stack they describe is the one docs/deploy.md promises: Redis as a cache behind a password, GPU
workers with their own devices, health-gated start order, Ray off port 6379, and commands that
the `kvpool` CLI accepts.
"""

import argparse
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kvpool.cli import build_parser
from tests.deploy.compose import (
    MissingVariable,
    interpolate,
    load,
    merge,
    simple_commands,
    strip_tags,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / ".." / "shared" / "schemas"
BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"

# What `.env` holds on a real box (docs/deploy.md); each is required, with no default.
ENV = {
    "REDIS_PASSWORD": "test-redis-password",
    "RAY_AUTH_TOKEN": "test-ray-token",
    "STORE_AUTH_TOKEN": "test-store-token",
    "NAMESPACE_SECRET": "test-namespace-secret",
    "GATEWAY_AUTH_TOKEN": "test-gateway-token-0123456789",
}
# What docs/deploy.md tells .env to hold for the cluster profile.
CLUSTER_URL = "redis+cluster://redis-cluster-0:7000,redis-cluster-1:7000,redis-cluster-2:7000"
# KVPOOL_* variables that are read as such, not as a `--flag` (kvpool/config.py).
NON_FLAG_ENV = {"KVPOOL_CACHE_DIR"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads((SCHEMAS / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return interpolate(load(BASE), ENV)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return interpolate(merge(load(BASE), load(CPU)), ENV)


def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return model["services"]


def commands(service: dict[str, Any]) -> list[list[str]]:
    return simple_commands(service["command"])


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return reservations.get("devices", [])


def ray_workers(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in services(model).items()
        if any(cmd[:2] == ["ray", "start"] and "--head" not in cmd for cmd in commands(svc))
    }


def kvpool_command(service: dict[str, Any], words: tuple[str, ...]) -> list[str]:
    found = [cmd for cmd in commands(service) if tuple(cmd[1 : 1 + len(words)]) == words]
    assert len(found) == 1, f"expected one `kvpool {' '.join(words)}` in {service['command']}"
    return found[0]


def option(cmd: list[str], name: str) -> str:
    """The value of `--name V` or `--name=V` in a command."""
    for i, word in enumerate(cmd):
        if word == name:
            return cmd[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


# --- schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BASE, CPU], ids=lambda p: p.name)
def test_each_file_validates_against_the_compose_spec(schema, path):
    jsonschema.Draft7Validator(schema).validate(interpolate(strip_tags(load(path)), ENV))


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_merged_model_validates_against_the_compose_spec(schema, gpu, cpu, which):
    jsonschema.Draft7Validator(schema).validate(gpu if which == "gpu" else cpu)


@pytest.mark.parametrize("variable", sorted(ENV))
def test_secrets_have_no_default(variable):
    """Without .env, compose refuses to start rather than run with a guessable secret."""
    env = {k: v for k, v in ENV.items() if k != variable}
    with pytest.raises(MissingVariable, match=variable):
        interpolate(load(BASE), env)


# --- redis --------------------------------------------------------------------------------------


def test_redis_is_a_cache_with_a_password_from_the_environment():
    raw = load(BASE)["services"]["redis"]
    assert raw["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    [cmd] = [c for c in simple_commands(interpolate(raw, ENV)["command"]) if c[0] == "redis-server"]
    assert option(cmd, "--maxmemory")  # bounded
    assert option(cmd, "--maxmemory-policy") == "allkeys-lru"
    assert option(cmd, "--save") == ""  # no RDB snapshots
    assert option(cmd, "--appendonly") == "no"  # no AOF
    # The password is expanded by the container's shell from its environment, never written here.
    assert option(cmd, "--requirepass") == "${REDIS_PASSWORD}"
    assert "ports" not in raw, "Redis must not be published outside the compose network"


def test_redis_does_not_run_as_root():
    """Issue 14: `sh -c "exec redis-server"` skips the image's drop to its redis user."""
    raw = load(BASE)["services"]["redis"]
    assert raw.get("user") not in (None, "", "root", "0", "0:0")


def test_the_store_token_is_its_own_and_the_gateway_is_on_loopback_by_default(gpu):
    """Issue 14, item 5 and the insecure defaults: the store and the gateway share the store's
    internal token, which no gateway client holds; the gateway is published on loopback."""
    store, head = services(gpu)["store"], services(gpu)["ray-head"]
    for svc in (store, head):
        assert svc["environment"]["KVPOOL_STORE_AUTH_TOKEN"] == ENV["STORE_AUTH_TOKEN"]
    assert "KVPOOL_AUTH_TOKEN" not in store["environment"]
    assert head["environment"]["KVPOOL_NAMESPACE_SECRET"] == ENV["NAMESPACE_SECRET"]
    assert "KVPOOL_NAMESPACE_SECRET" not in store["environment"]  # the store never sees it
    for name, svc in services(gpu).items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_store_reaches_redis_with_the_same_password(gpu):
    env = services(gpu)["store"]["environment"]
    assert env["KVPOOL_BACKEND"].startswith("redis://redis:6379/")
    assert env["KVPOOL_REDIS_PASSWORD"] == ENV["REDIS_PASSWORD"]
    assert "@" not in env["KVPOOL_BACKEND"], "keep the password out of the URL (and the logs)"


def test_cluster_profile_is_three_masters_with_replicas_as_a_cache(gpu):
    nodes = {name: svc for name, svc in services(gpu).items() if name.startswith("redis-cluster-")}
    init = nodes.pop("redis-cluster-init")
    assert len(nodes) == 6
    for name, svc in [*nodes.items(), ("redis-cluster-init", init)]:
        assert svc["profiles"] == ["cluster"], f"{name} would start without the profile"
        assert "ports" not in svc, f"{name}: Redis must not be published"
        assert svc["environment"]["REDIS_PASSWORD"] == ENV["REDIS_PASSWORD"]
    for name, svc in nodes.items():
        [cmd] = [c for c in commands(svc) if c[0] == "redis-server"]
        assert option(cmd, "--cluster-enabled") == "yes", name
        assert option(cmd, "--cluster-require-full-coverage") == "no", name
        assert option(cmd, "--maxmemory-policy") == "allkeys-lru", name
        assert option(cmd, "--save") == "" and option(cmd, "--appendonly") == "no", name
        assert option(cmd, "--requirepass") == option(cmd, "--masterauth") == "${REDIS_PASSWORD}"
        assert svc["healthcheck"]["test"][0] == "CMD-SHELL", name
        assert init["depends_on"][name]["condition"] == "service_healthy"
    [create] = [c for c in commands(init) if c[:3] == ["redis-cli", "--cluster", "create"]]
    addresses = [word for word in create[3:] if word.endswith(":7000")]
    assert len(addresses) == 6
    assert sorted(a for n in nodes for a in addresses if n in a) == sorted(addresses)
    assert option(create, "--cluster-replicas") == "1"  # 6 nodes: three masters, three replicas
    assert "--cluster-yes" in create


def test_store_uses_the_cluster_when_told_and_waits_for_it():
    raw = load(BASE)["services"]["store"]
    on_cluster = interpolate(load(BASE), {**ENV, "KVPOOL_STORE_BACKEND": CLUSTER_URL})
    store = services(on_cluster)["store"]
    assert store["environment"]["KVPOOL_BACKEND"] == CLUSTER_URL
    from services.store.backends.redis_cluster import ClusterUrl

    seeds = ClusterUrl.parse(CLUSTER_URL).seeds
    assert {f"{host}" for host, _ in seeds} <= set(services(on_cluster))
    init = raw["depends_on"]["redis-cluster-init"]
    assert init == {"condition": "service_completed_successfully", "required": False}
    assert interpolate(raw, ENV)["environment"]["KVPOOL_PROCESSES"] == "0"


# --- GPUs ---------------------------------------------------------------------------------------


def test_one_worker_service_per_gpu_with_its_own_device(gpu):
    workers = ray_workers(gpu)
    assert len(workers) >= 2
    seen: list[str] = []
    for name, svc in workers.items():
        [device] = gpu_devices(svc)
        assert device["driver"] == "nvidia", name
        assert device["capabilities"] == ["gpu"], name
        assert "count" not in device, f"{name}: pin devices with device_ids, not a count"
        assert len(device["device_ids"]) == 1, name
        seen += device["device_ids"]
        assert svc["shm_size"], f"{name}: Ray's object store needs a /dev/shm of its own size"
        [start] = [c for c in commands(svc) if c[:2] == ["ray", "start"]]
        assert (
            option(start, "--num-gpus") == "${NODE_GPUS}" and svc["environment"]["NODE_GPUS"] == "1"
        )
    assert len(seen) == len(set(seen)), f"device_ids shared between workers: {seen}"
    assert services(gpu)["ray-head"]["shm_size"]


def test_gateway_starts_one_worker_per_gpu_node(gpu):
    head = services(gpu)["ray-head"]
    gateway = kvpool_command(head, ("gateway", "serve"))
    assert int(option(gateway, "--workers")) == len(ray_workers(gpu))
    assert head["environment"]["KVPOOL_WORKER_GPUS"] == "1"
    # The head offers nothing to schedule on, so every worker actor lands on a GPU node.
    [start] = [c for c in commands(head) if c[:2] == ["ray", "start"]]
    assert option(start, "--num-gpus") == "0" and option(start, "--num-cpus") == "0"


def test_cpu_override_runs_the_same_stack_without_gpus(gpu, cpu):
    assert set(services(cpu)) == set(services(gpu))
    for name, svc in services(cpu).items():
        assert not gpu_devices(svc), f"{name} still reserves a GPU"
    assert services(cpu)["ray-head"]["environment"]["KVPOOL_WORKER_GPUS"] == "0"
    for name, svc in ray_workers(cpu).items():
        assert svc["environment"]["NODE_GPUS"] == "0", name
        assert int(svc["environment"]["NODE_CPUS"]) >= 1, name
    images = {
        svc["image"] for svc in services(cpu).values() if not svc["image"].startswith("redis:")
    }
    assert images == {"kvpool:0.1.0-cpu"}


# --- start order and health ---------------------------------------------------------------------


def test_healthchecks_and_start_order(gpu):
    svc = services(gpu)
    for name in ("redis", "store", "ray-head"):
        check = svc[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
    assert "redis-cli" in " ".join(svc["redis"]["healthcheck"]["test"])
    for name in ("store", "ray-head"):
        test = " ".join(svc[name]["healthcheck"]["test"])
        assert "grpc_health.v1" in test and "SERVING" in test, name
    port = {"store": "50052", "ray-head": "50051"}
    for name, expected in port.items():
        assert svc[name]["environment"]["GRPC_HEALTH_ADDR"] == f"127.0.0.1:{expected}"
    assert svc["store"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["ray-head"]["depends_on"]["store"]["condition"] == "service_healthy"
    for name, worker in ray_workers(gpu).items():
        # service_started, not healthy: the gateway only turns healthy after workers join.
        assert worker["depends_on"]["ray-head"]["condition"] == "service_started", name


# --- ports --------------------------------------------------------------------------------------


def published_ports(service: dict[str, Any]) -> list[str]:
    ports = []
    for entry in service.get("ports", []):
        text = str(entry["published"] if isinstance(entry, dict) else entry)
        ports.append(text.rsplit(":", 1)[0].rsplit(":", 1)[-1] if ":" in text else text)
    return ports


def test_nothing_uses_6379_but_redis(gpu):
    for name, svc in services(gpu).items():
        assert "6379" not in published_ports(svc), f"{name} publishes 6379"
        for cmd in commands(svc):
            if cmd[0] == "ray":
                assert not any("6379" in word for word in cmd), f"{name}: Ray on 6379: {cmd}"
    [head_start] = [
        c for c in commands(services(gpu)["ray-head"]) if c[:3] == ["ray", "start", "--head"]
    ]
    head_port = option(head_start, "--port")
    assert head_port != "6379"
    assert services(gpu)["ray-head"]["environment"]["RAY_ADDRESS"] == f"127.0.0.1:{head_port}"
    for name, worker in ray_workers(gpu).items():
        for cmd in commands(worker):
            if cmd[0] == "ray" and cmd[1] in ("start", "health-check"):
                assert option(cmd, "--address") == f"ray-head:{head_port}", name


def test_ray_token_auth_is_on_for_every_ray_node(gpu):
    for name, svc in services(gpu).items():
        if any(cmd[0] == "ray" for cmd in commands(svc)):
            assert svc["environment"]["RAY_AUTH_MODE"] == "token", name
            assert svc["environment"]["RAY_AUTH_TOKEN"] == ENV["RAY_AUTH_TOKEN"], name


# --- the CLI ------------------------------------------------------------------------------------


def parse(words: list[str]) -> argparse.Namespace:
    parser = build_parser()
    try:
        return parser.parse_args(words)
    except SystemExit as exc:  # argparse reports bad flags by exiting
        raise AssertionError(f"`kvpool {' '.join(words)}` is not a valid command") from exc


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_every_kvpool_command_exists_in_the_cli(gpu, cpu, which):
    model = gpu if which == "gpu" else cpu
    ran = 0
    for name, svc in services(model).items():
        for cmd in commands(svc):
            if cmd[0] != "kvpool":
                continue
            ran += 1
            args = parse(cmd[1:])
            # Settings passed as KVPOOL_<FLAG> must name a flag of the same command.
            for variable in svc.get("environment", {}):
                if variable.startswith("KVPOOL_") and variable not in NON_FLAG_ENV:
                    dest = variable.removeprefix("KVPOOL_").lower()
                    assert hasattr(args, dest), f"{name}: {variable} is not a flag of {cmd[:3]}"
    assert ran >= 2  # the store and the gateway


def test_the_gateway_publishes_the_openai_http_api(gpu):
    head = services(gpu)["ray-head"]
    gateway = kvpool_command(head, ("gateway", "serve"))
    assert option(gateway, "--http-port") == "8000"
    assert "8000" in published_ports(head)


def test_every_container_is_hardened_and_bounded(gpu, cpu):
    """Issue 23: compose services had no memory or CPU limits, cap_drop, no-new-privileges or
    read_only."""
    for model in (gpu, cpu):
        for name, svc in services(model).items():
            assert svc.get("read_only") is True, name
            assert svc.get("cap_drop") == ["ALL"], name
            assert "no-new-privileges:true" in svc.get("security_opt", []), name
            if name != "redis-cluster-init":  # a one-shot that exits at once
                assert svc.get("mem_limit") and svc.get("cpus"), name
            if name.startswith("ray-") or name == "store":
                assert {"/tmp", "/home/kvpool"} <= set(svc.get("tmpfs", [])), name


def test_the_gateway_requires_a_token_and_keeps_metrics_apart(gpu):
    """Issue 23: with auth off the gateway served anyone who reached it."""
    head = services(gpu)["ray-head"]
    assert head["environment"]["KVPOOL_AUTH_TOKEN"] == ENV["GATEWAY_AUTH_TOKEN"]
    raw = load(BASE)["services"]["ray-head"]["environment"]["KVPOOL_AUTH_TOKEN"]
    assert raw.startswith("${GATEWAY_AUTH_TOKEN:?")
    gateway = kvpool_command(head, ("gateway", "serve"))
    assert "--insecure-no-auth" not in gateway
    assert option(gateway, "--metrics-host") == "0.0.0.0"  # published on the host's loopback
    assert "127.0.0.1:9090:9090" in head["ports"]
