"""The Helm chart, linted and rendered in-process (helm-python-sdk), checked offline.

Every core kind passes `kubernetes-validate` (strict: unknown fields fail) for the oldest and the
newest Kubernetes the chart supports. The RayCluster passes KubeRay's CRD schema
(`../shared/schemas/ray.io_rayclusters.yaml`), made strict the way `kubectl apply` with server-side
field validation is. Then the content: GPU vs CPU worker groups, Redis as a cache, the gateway in
the Ray head pod with gRPC probes, Services that select real pods, and a gateway command that the
`kvpool` CLI accepts.
"""

import copy
import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvpool.cli import build_parser
from tests.deploy.compose import simple_commands

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvpool"
SCHEMAS = REPO / ".." / "shared" / "schemas"
RELEASE, NAMESPACE = "kvp", "inference"
# The chart's kubeVersion floor and the newest release kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
CORE_API_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")

VALUES = {
    "default": {},
    "gpu": yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text()),
    "cpu": yaml.safe_load((CHART / "ci" / "cpu-values.yaml").read_text()),
}
EXTERNAL_REDIS = {
    "redis": {
        "mode": "external",
        "external": {"url": "rediss://cache.example.com:6380/0", "existingSecret": "redis-creds"},
    }
}
CLUSTER_REDIS = {
    "redis": {
        "mode": "cluster",
        "cluster": {
            "addresses": ["cfg.cache.example.com:6379", "10.0.0.7:6379"],
            "tls": True,
            "username": "kvpool",
            "params": "ssl_ca_certs=/etc/kvpool/tls/ca.crt",
            "existingSecret": "redis-creds",
        },
    },
    "store": {"processes": 4},
}
SECURED = {"auth": {"enabled": True}, "tls": {"enabled": True, "existingSecret": "kvpool-tls"}}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.fixture(scope="module", params=sorted(VALUES))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(VALUES[request.param])


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    return [
        doc
        for doc in docs
        if doc["kind"] == kind
        and (
            component is None
            or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def raycluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "RayCluster")


def head_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_group(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [group] = raycluster(docs)["spec"]["workerGroupSpecs"]
    return group


def env_names(container: dict[str, Any]) -> set[str]:
    return {item["name"] for item in container.get("env", [])}


# --- lint and schema ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_chart_lints_strict(name):
    report = helm.lint(CHART, VALUES[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize(
    "values",
    [
        {"accelerator": "tpu"},
        {"ray": {"gcsPort": 6379}},  # Redis' port
        {"redis": {"mode": "external"}},  # external needs a URL
        {"redis": {"mode": "cluster"}},  # a cluster needs its addresses
        {"redis": {"mode": "cluster", "cluster": {"addresses": []}}},
        {"redis": {"mode": "cluster", "cluster": {"addresses": ["redis://h:6379"]}}},
        {"redis": {"mode": "cluster", "cluster": {"addresses": ["h:1,h:2"]}}},  # one per item
        {"store": {"processes": -1}},
        {"tls": {"enabled": True}},  # TLS needs its Secret
        {"redis": {"bundled": {"maxmemory": "2GiB"}}},  # not a unit Redis reads
        {"model": {"codec": "int3"}},
        {"store": {"replicas": 0}},
        {"replicaCount": 3},  # unknown top-level key: a typo, not a silent no-op
    ],
    ids=lambda v: json.dumps(v),
)
def test_values_schema_rejects_mistakes(values):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError):
        chart.validate_schema(values)


# --- validation of every rendered object --------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_kinds_pass_kubernetes_validate(rendered, version):
    _, docs = rendered
    core = [doc for doc in docs if doc["apiVersion"] in CORE_API_GROUPS]
    kinds = {doc["kind"] for doc in core}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Pod"} <= kinds
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_secured_and_external_variants_pass_kubernetes_validate():
    for values in (SECURED, EXTERNAL_REDIS, {**VALUES["cpu"], **SECURED}):
        for doc in render(values):
            if doc["apiVersion"] in CORE_API_GROUPS:
                kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
            else:
                raycluster_validator().validate(doc)


def strict(schema: Any) -> Any:
    """Unknown fields become errors, as with `kubectl apply --validate=strict` on a CRD."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # metadata is validated by the API server itself, not by the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_raycluster_passes_the_kuberay_crd_schema(rendered):
    _, docs = rendered
    cluster = raycluster(docs)
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = sorted(raycluster_validator().iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_strict_crd_schema_catches_a_typo():
    cluster = raycluster(render({}))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2
    assert list(raycluster_validator().iter_errors(cluster))


# --- GPU and CPU --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "gpu"])
def test_gpu_values_give_gpu_workers(name):
    docs = render(VALUES[name])
    group = worker_group(docs)
    pod = group["template"]["spec"]
    [container] = pod["containers"]
    gpus = VALUES[name].get("ray", {}).get("workers", {}).get("gpusPerWorker", 1)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    gateway = gateway_command(docs)
    assert option(gateway, "--worker-gpus") == "1"
    assert int(option(gateway, "--workers")) == group["replicas"] * gpus
    assert not head_container(docs)["image"].endswith("-cpu")


def test_cpu_values_give_no_gpu_anything():
    docs = render(VALUES["cpu"])
    group = worker_group(docs)
    assert "nvidia.com/gpu" not in json.dumps(group)
    assert "nvidia.com/gpu" not in json.dumps(raycluster(docs)["spec"]["headGroupSpec"])
    pod = group["template"]["spec"]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    gateway = gateway_command(docs)
    assert option(gateway, "--worker-gpus") == "0"
    # One actor per worker pod: the pod offers exactly the CPU slots one actor asks for.
    assert group["rayStartParams"]["num-cpus"] == option(gateway, "--worker-cpus")
    assert int(option(gateway, "--workers")) == group["replicas"]
    images = {c["image"] for d in docs for c in containers(d) if "kvpool" in c["image"]}
    assert images == {"kvpool:0.1.0-cpu"}


# --- the gateway in the Ray head ----------------------------------------------------------------


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def gateway_command(docs: list[dict[str, Any]]) -> list[str]:
    container = head_container(docs)
    found = [
        cmd
        for cmd in simple_commands([*container["command"][:2], container["args"][0]])
        if cmd[:3] == ["kvpool", "gateway", "serve"]
    ]
    assert len(found) == 1, container["args"]
    return found[0]


def test_gateway_command_exists_in_the_cli(rendered):
    _, docs = rendered
    words = gateway_command(docs)
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit as exc:
        raise AssertionError(f"`{' '.join(words)}` is not a valid command") from exc
    store = one(docs, "Service", "store")
    assert args.store == f"{store['metadata']['name']}:{store['spec']['ports'][0]['port']}"


def test_head_runs_ray_off_6379_and_the_gateway_joins_it(rendered):
    _, docs = rendered
    head = raycluster(docs)["spec"]["headGroupSpec"]
    port = head["rayStartParams"]["port"]
    assert port != "6379"
    container = head_container(docs)
    assert {"name": "RAY_ADDRESS", "value": f"127.0.0.1:{port}"} in container["env"]
    assert {"name": "gcs-server", "containerPort": int(port)} in container["ports"]
    assert head["template"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert '"$KUBERAY_GEN_RAY_START_CMD"' in container["args"][0]
    assert head["rayStartParams"]["num-cpus"] == "0", "worker actors must not land on the head"


def test_gateway_has_grpc_probes_and_a_service_on_the_head_pod(rendered):
    _, docs = rendered
    container = head_container(docs)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    service = one(docs, "Service", "gateway")
    [grpc] = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "grpc"
    head_labels = raycluster(docs)["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()


def test_tls_switches_probes_to_an_in_container_check():
    docs = render(SECURED)
    for container in (head_container(docs), store_container(docs)):
        probe = container["readinessProbe"]
        assert "grpc" not in probe and "ssl_channel_credentials" in " ".join(
            probe["exec"]["command"]
        )
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/kvpool/tls" in mounts


# --- store, Redis, auth -------------------------------------------------------------------------


def store_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "store")["spec"]["template"]["spec"]["containers"][0]


def test_store_deployment_service_and_probes(rendered):
    name, docs = rendered
    deployment = one(docs, "Deployment", "store")
    replicas = VALUES[name].get("store", {}).get("replicas", 2)
    assert deployment["spec"]["replicas"] == replicas
    container = store_container(docs)
    assert container["command"] == ["kvpool", "store", "serve"]
    try:
        build_parser().parse_args(["store", "serve", *container["args"]])
    except SystemExit as exc:
        raise AssertionError(f"bad store args {container['args']}") from exc
    assert container["readinessProbe"]["grpc"]["port"] == 50052
    assert container["resources"]["requests"]
    service = one(docs, "Service", "store")
    assert service["spec"]["ports"][0]["port"] == 50052


def test_bundled_redis_is_a_cache_with_a_secret_password():
    docs = render({})
    conf = one(docs, "ConfigMap", "redis")["data"]["redis.conf"].splitlines()
    assert "maxmemory-policy allkeys-lru" in conf
    assert 'save ""' in conf and "appendonly no" in conf
    assert any(line.startswith("maxmemory ") for line in conf)
    assert not any("requirepass" in line for line in conf)
    statefulset = one(docs, "StatefulSet", "redis")
    assert "volumeClaimTemplates" not in statefulset["spec"], "a cache needs no persistence"
    [redis] = [
        c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"
    ]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    secret = one(docs, "Secret", "redis")
    ref = next(e for e in redis["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"]
    assert ref["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert ref["secretKeyRef"]["key"] in secret["data"]
    store_env = {e["name"]: e for e in store_container(docs)["env"]}
    assert store_env["KVPOOL_BACKEND"]["value"].startswith("redis://kvp-kvpool-redis:6379/")
    assert store_env["KVPOOL_REDIS_PASSWORD"]["valueFrom"] == ref
    one(docs, "Service", "redis")


def test_redis_cluster_addresses_become_the_store_cluster_url():
    docs = render(CLUSTER_REDIS)
    assert not find(docs, "StatefulSet") and not find(docs, "ConfigMap", "redis")
    container = store_container(docs)
    env = {e["name"]: e for e in container["env"]}
    url = env["KVPOOL_BACKEND"]["value"]
    assert url == (
        "rediss+cluster://kvpool@cfg.cache.example.com:6379,10.0.0.7:6379"
        "?ssl_ca_certs=/etc/kvpool/tls/ca.crt"
    )
    from services.store.backends.redis_cluster import ClusterUrl

    parsed = ClusterUrl.parse(url)  # the store accepts what the chart writes
    assert parsed.seeds == (("cfg.cache.example.com", 6379), ("10.0.0.7", 6379))
    assert parsed.options["ssl"] is True and parsed.options["username"] == "kvpool"
    ref = env["KVPOOL_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-creds", "key": "redis-password"}
    args = build_parser().parse_args(["store", "serve", *container["args"]])
    assert args.processes == 4
    plain = render({"redis": {"mode": "cluster", "cluster": {"addresses": ["r:7000"]}}})
    plain_env = {e["name"]: e for e in store_container(plain)["env"]}
    assert plain_env["KVPOOL_BACKEND"]["value"] == "redis+cluster://r:7000"
    assert "KVPOOL_REDIS_PASSWORD" not in plain_env


def test_cluster_values_lint_strict():
    report = helm.lint(CHART, CLUSTER_REDIS, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_external_redis_uses_its_url_and_existing_secret():
    docs = render(EXTERNAL_REDIS)
    assert not find(docs, "StatefulSet") and not find(docs, "ConfigMap", "redis")
    env = {e["name"]: e for e in store_container(docs)["env"]}
    assert env["KVPOOL_BACKEND"]["value"] == "rediss://cache.example.com:6380/0"
    ref = env["KVPOOL_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-creds", "key": "redis-password"}


def test_the_store_accepts_only_its_own_token_which_no_gateway_client_holds():
    """Issue 14, item 5: the gateway's token (a tenant's) never reaches the store; the store's
    internal token, from its own Secret, reaches only the store and the gateway."""
    for values in (SECURED, {}):
        docs = render(values)
        store_secret = one(docs, "Secret", "store-token")
        head = head_container(docs)
        worker = worker_group(docs)["template"]["spec"]["containers"][0]

        def env(container: dict[str, Any]) -> dict[str, Any]:
            return {e["name"]: e for e in container.get("env", [])}

        for container in (store_container(docs), head):
            ref = env(container)["KVPOOL_STORE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == store_secret["metadata"]["name"]
        assert "KVPOOL_AUTH_TOKEN" not in env(store_container(docs))
        ns = env(head)["KVPOOL_NAMESPACE_SECRET"]["valueFrom"]["secretKeyRef"]
        assert ns["name"] == store_secret["metadata"]["name"] and ns["key"] in store_secret["data"]
        assert "KVPOOL_NAMESPACE_SECRET" not in env(store_container(docs))
        assert not {"KVPOOL_AUTH_TOKEN", "KVPOOL_STORE_AUTH_TOKEN"} & set(env(worker))
    docs = render(SECURED)
    secret = one(docs, "Secret", "auth")
    ref = {e["name"]: e for e in head_container(docs)["env"]}["KVPOOL_AUTH_TOKEN"]
    assert ref["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert not find(render({"auth": {"enabled": False}}), "Secret", "auth")


# --- wiring -------------------------------------------------------------------------------------


def pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    templates = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            templates.append(doc["spec"]["template"])
        elif doc["kind"] == "RayCluster":
            templates.append(doc["spec"]["headGroupSpec"]["template"])
            templates += [g["template"] for g in doc["spec"]["workerGroupSpecs"]]
    return templates


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Pod":
        return doc["spec"]["containers"]
    if doc["kind"] in ("Deployment", "StatefulSet", "RayCluster"):
        return [c for t in pod_templates([doc]) for c in t["spec"]["containers"]]
    return []


def test_services_and_pdbs_select_pods_of_the_chart(rendered):
    _, docs = rendered
    labels = [t["metadata"]["labels"] for t in pod_templates(docs)]
    for service in find(docs, "Service"):
        selector = service["spec"]["selector"]
        matched = [pod for pod in labels if selector.items() <= pod.items()]
        assert len(matched) == 1, f"{service['metadata']['name']} selects {len(matched)} pods"
    for pdb in find(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= pod.items() for pod in labels), pdb["metadata"]["name"]
    assert {
        p["metadata"]["labels"]["app.kubernetes.io/component"]
        for p in find(docs, "PodDisruptionBudget")
    } == {"store", "ray-worker"}


def test_kvpool_containers_run_as_non_root_with_resources(rendered):
    _, docs = rendered
    for template in pod_templates(docs):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in template["spec"]["containers"]:
            assert container["resources"]["requests"], container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_ray_pods_get_a_shared_memory_volume(rendered):
    _, docs = rendered
    cluster = raycluster(docs)
    for template in [cluster["spec"]["headGroupSpec"]["template"], worker_group(docs)["template"]]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts


def test_helm_test_pod_asks_the_gateway(rendered):
    _, docs = rendered
    [pod] = [d for d in docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    words = container["command"][1:] + container["args"]
    build_parser().parse_args(words)
    gateway = one(docs, "Service", "gateway")
    assert option(words, "--target") == f"{gateway['metadata']['name']}:50051"


# --- the head container's script ----------------------------------------------------------------

STUB_RAY = """#!/bin/bash
[ "$1" = health-check ] && [ -e "$STUB_DIR/gcs-up" ]
"""
STUB_GATEWAY = """#!/bin/bash
echo "gateway: $*"
trap 'echo gateway stopped; exit 0' TERM
while true; do sleep 0.1; done
"""
STUB_GATEWAY_CRASH = """#!/bin/bash
sleep 0.5; exit 3
"""
# Stands in for KubeRay's generated `ray start --head ... --block`.
FAKE_RAY_START = (
    "touch \"$STUB_DIR/gcs-up\"; trap 'echo ray stopped; exit 0' TERM; "
    "while true; do sleep 0.1; done"
)


def run_head_script(tmp_path: Path, gateway_stub: str, stop_after_s: float | None):
    for name, body in (("ray", STUB_RAY), ("kvpool", gateway_stub)):
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    container = head_container(render({}))
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "KUBERAY_GEN_RAY_START_CMD": FAKE_RAY_START,
    }
    proc = subprocess.Popen(
        [*container["command"], container["args"][0]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        if stop_after_s is not None:
            time.sleep(stop_after_s)
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends on pod deletion
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_head_script_stops_the_gateway_then_ray_on_sigterm(tmp_path):
    status, out = run_head_script(tmp_path, STUB_GATEWAY, stop_after_s=2.0)
    assert status == 0, out
    assert "gateway: gateway serve --host 0.0.0.0 --port 50051" in out
    assert out.index("gateway stopped") < out.index("ray stopped"), out


def test_head_script_exits_when_the_gateway_dies(tmp_path):
    status, out = run_head_script(tmp_path, STUB_GATEWAY_CRASH, stop_after_s=None)
    assert status == 1, out  # the pod restarts rather than run Ray without its gateway
    assert "ray stopped" in out


def test_gateway_limits_and_tenant_tokens_reach_the_gateway():
    values = {
        **SECURED,
        "auth": {"enabled": True, "tenantTokens": {"existingSecret": "kvpool-tenants"}},
        "gateway": {"limits": {"maxPromptTokens": 4096, "maxRequestBytes": "1MiB"}},
    }
    docs = render(values)
    args = build_parser().parse_args(gateway_command(docs)[1:])
    assert (args.max_prompt_tokens, args.max_request_bytes, args.max_sessions) == (4096, 1 << 20, 0)
    head = head_container(docs)
    [file_env] = [e for e in head["env"] if e["name"] == "KVPOOL_AUTH_TOKEN_FILE"]
    [mount] = [m for m in head["volumeMounts"] if m["name"] == "tenant-tokens"]
    assert file_env["value"] == f"{mount['mountPath']}/tokens"
    volumes = raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == "tenant-tokens"]
    assert volume["secret"]["secretName"] == "kvpool-tenants"
    # Only the gateway holds the tenants' tokens; the store and workers keep the shared one.
    for container in (
        store_container(docs),
        worker_group(docs)["template"]["spec"]["containers"][0],
    ):
        assert "KVPOOL_AUTH_TOKEN_FILE" not in {e["name"] for e in container["env"]}


def test_the_openai_http_api_is_off_by_default_and_exposed_when_on():
    docs = render({})
    assert build_parser().parse_args(gateway_command(docs)[1:]).http_port == 0  # off
    assert "http" not in {p["name"] for p in head_container(docs)["ports"]}
    assert "http" not in {p["name"] for p in one(docs, "Service", "gateway")["spec"]["ports"]}

    docs = render({**SECURED, "gateway": {"http": {"enabled": True, "port": 8080}}})
    assert build_parser().parse_args(gateway_command(docs)[1:]).http_port == 8080
    [port] = [p for p in head_container(docs)["ports"] if p["name"] == "http"]
    assert port["containerPort"] == 8080
    [service_port] = [
        p for p in one(docs, "Service", "gateway")["spec"]["ports"] if p["name"] == "http"
    ]
    assert (service_port["port"], service_port["targetPort"]) == (8080, "http")
    for doc in docs:
        if doc["apiVersion"] in CORE_API_GROUPS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
        else:
            raycluster_validator().validate(doc)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError):
        chart.validate_schema({"gateway": {"http": {"enabled": True, "port": 0}}})


def test_the_engine_value_reaches_the_gateway():
    default = build_parser().parse_args(gateway_command(render({}))[1:])
    assert (default.engine, default.vllm_python) == ("transformers", None)
    docs = render({"model": {"engine": "vllm", "vllmPython": "/opt/vllm/bin/python"}})
    args = build_parser().parse_args(gateway_command(docs)[1:])
    assert (args.engine, args.vllm_python) == ("vllm", "/opt/vllm/bin/python")
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError):
        chart.validate_schema({"model": {"engine": "tgi"}})


def test_network_policies_keep_the_store_redis_and_ray_private():
    """Issue 14: no NetworkPolicy guarded the store, Redis or Ray's dashboard and client ports."""
    docs = render({})
    policies = {p["metadata"]["name"]: p["spec"] for p in find(docs, "NetworkPolicy")}
    store = next(s for n, s in policies.items() if n.endswith("-store"))
    [from_pods, metrics] = store["ingress"]
    components = from_pods["from"][0]["podSelector"]["matchExpressions"][1]["values"]
    assert sorted(components) == ["gateway", "ray-worker"]
    assert [p["port"] for p in from_pods["ports"]] == [50052]
    assert "from" not in metrics and [p["port"] for p in metrics["ports"]] == [9091]
    redis_policy = next(s for n, s in policies.items() if n.endswith("-redis"))
    [only] = redis_policy["ingress"]
    assert only["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "store"
    ray = next(s for n, s in policies.items() if n.endswith("-ray"))
    open_to_all = [rule for rule in ray["ingress"] if "from" not in rule]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in open_to_all] == [[50051]]
    # The metrics port names tenants: this namespace's pods only (issue 23).
    [metrics_rule] = [
        r for r in ray["ingress"] if [p["port"] for p in r.get("ports", [])] == [9090]
    ]
    assert metrics_rule["from"] == [{"podSelector": {}}]
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_the_network_policy_admits_the_http_api_when_it_is_on():
    """Issue 23: with gateway.http enabled, the chart's own policy blocked the HTTP port."""
    docs = render({"gateway": {"http": {"enabled": True, "port": 8080}}})
    ray = next(
        p["spec"] for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")
    )
    open_to_all = [rule for rule in ray["ingress"] if "from" not in rule]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in open_to_all] == [[8080, 50051]]
    prometheus = [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]
    docs = render({"networkPolicy": {"metricsFrom": prometheus}})
    ray = next(
        p["spec"] for p in find(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray")
    )
    [metrics_rule] = [
        r for r in ray["ingress"] if [p["port"] for p in r.get("ports", [])] == [9090]
    ]
    assert metrics_rule["from"] == prometheus


def test_auth_is_on_by_default():
    """Issue 23: the chart's default served the gateway without auth."""
    docs = render({})
    env = {e["name"]: e for e in head_container(docs)["env"]}
    assert (
        env["KVPOOL_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
        == (one(docs, "Secret", "auth")["metadata"]["name"])
    )


def test_an_existing_secret_without_the_namespace_secret_key_is_refused():
    """Issue 23: store.auth.existingSecret without the namespace secret salted with tenants'
    names, silently (`optional: true`)."""
    given = {"store": {"auth": {"existingSecret": "kvpool-store"}}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as err:
        chart.render(given, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert "store.auth.namespaceSecretKey" in str(err.value)
    docs = render(
        {"store": {"auth": {"existingSecret": "kvpool-store", "namespaceSecretKey": "ns"}}}
    )
    ref = {e["name"]: e for e in head_container(docs)["env"]}["KVPOOL_NAMESPACE_SECRET"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "kvpool-store", "key": "ns"}
    for values in ({}, SECURED):  # never optional: a pod without it does not start
        head = {e["name"]: e for e in head_container(render(values))["env"]}
        assert "optional" not in head["KVPOOL_NAMESPACE_SECRET"]["valueFrom"]["secretKeyRef"]


def test_the_gateway_serves_without_auth_only_when_the_values_say_so():
    """Issue 23: the gateway refuses --host 0.0.0.0 with auth off unless --insecure-no-auth."""
    assert "--insecure-no-auth" not in gateway_command(render({}))
    assert "--insecure-no-auth" in gateway_command(render({"auth": {"enabled": False}}))
    tenants = {"auth": {"enabled": False, "tenantTokens": {"existingSecret": "tenants"}}}
    assert "--insecure-no-auth" not in gateway_command(render(tenants))
    assert "--metrics-host" in gateway_command(render({}))
