"""The import graph: layers point down, no circles, and the gateway never loads torch.

Layers (docs/architecture.md): ground is the contracts and the pure core (errors, config, the
generated stubs, the workers' torch-free API, the KV core); the middle is the workers and the
services; the top is the CLI and the benchmarks. Every import written in a module counts, lazy
and TYPE_CHECKING ones included, since each is a dependency someone has to keep working.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvpool", "services", "workers")
GROUND = ("kvpool.errors", "kvpool.config", "kvpool.v1", "workers.api", "workers.kv")
TOP = ("kvpool.cli", "kvpool.commands", "kvpool.bench", "kvpool.configdoc")
# What the gateway may import from the workers: their torch-free API, the pure hashing and window
# arithmetic, tokenization, and the actor module the pool starts actors with (it imports the
# torch side only inside the actor's own process).
GATEWAY_MAY_IMPORT = (
    "workers.api",
    "workers.prompt",
    "workers.actor",
    "workers.node_tier",  # the node tier's Ray actor, which the pool starts once per node
    "workers.kv.hashing",
    "workers.kv.bounds",
)
TORCH = ("torch", "transformers.cache_utils", "transformers.modeling_utils")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer(module: str) -> int:
    if _under(module, GROUND):
        return 0
    if _under(module, TOP):
        return 2
    return 1


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """The project modules (and torch) that `module` imports."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    project = {n for n in names if n in MODULES}
    return project | {n for n in names if _under(n, TORCH)}


def test_every_package_module_is_seen():
    assert {"workers.api", "services.gateway.core", "kvpool.cli"} <= set(MODULES)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [
        f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
        for m in sorted(MODULES)
        for i in sorted(imports(m))
        if i in MODULES and layer(i) > layer(m)
    ]
    assert upward == []


def test_no_import_circle():
    graph = {m: {i for i in imports(m) if i in MODULES and i != m} for m in MODULES}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_gateway_imports_only_the_workers_torch_free_modules():
    gateway = [m for m in MODULES if m.startswith("services.gateway")]
    assert gateway
    reached = {
        f"{m} imports {i}"
        for m in gateway
        for i in imports(m)
        if (i.startswith("workers.") and not _under(i, GATEWAY_MAY_IMPORT)) or _under(i, TORCH)
    }
    assert reached == set()


def test_what_the_gateway_imports_from_the_workers_loads_no_torch_at_import():
    """Top-level imports only, followed through every module: none reaches torch."""
    seen: set[str] = set()
    todo = [m for m in MODULES if _under(m, GATEWAY_MAY_IMPORT)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imports(module, top_level_only=True):
            assert not _under(name, TORCH), f"{module} imports {name} at import time"
            if name in MODULES:
                todo.append(name)


@pytest.mark.parametrize("module", ["services.gateway.server", "services.gateway.cli"])
def test_importing_the_gateway_leaves_torch_out(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_only_the_vllm_connector_imports_vllm():
    """vLLM lives in a venv of its own (`make vllm`): the connector may import it, and the
    programs run with that venv's python: the engine runner of its bench and tests, and the
    engine process of a `--engine vllm` worker (`kvpool.integrations.vllm_process`, started by
    `workers.vllm_worker` as a child, never imported: see the next test)."""
    allowed = {
        "kvpool.integrations.vllm",
        "kvpool.integrations.vllm_process",
        "kvpool.bench.vllm_engine",
        "kvpool.bench.vllm",
    }
    importers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                importers.add(module)
    assert "kvpool.integrations.vllm" in importers
    assert importers <= allowed, importers - allowed


def test_the_vllm_engine_process_is_run_never_imported():
    """It runs in vLLM's venv only: a module of kvpool's venv that imported it would import
    vLLM there. The worker names it as the program it starts, in a string."""
    importers = {
        m for m in MODULES for i in imports(m) if _under(i, ("kvpool.integrations.vllm_process",))
    }
    assert importers == set()
    assert "kvpool.integrations.vllm_process" in MODULES["workers.vllm_worker"].read_text()
