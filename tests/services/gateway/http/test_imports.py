"""The HTTP layer stays torch-free and reaches the core only through its public modules."""

import ast
from pathlib import Path

import services.gateway.http as package

# What the layer may import from kvpool's own code: the error tree, auth, the per-tenant call
# quota it shares with the gRPC front, the core's public API and the domain dataclasses
# (SamplingParams, PromptInput, ChatMessage).
ALLOWED_OWN = {
    "kvpool.errors",
    "kvpool",
    "services.auth",
    "services.quota",
    "services.gateway.api",
    "services.gateway.core",
    "workers.api",
}
FORBIDDEN = {"torch", "transformers", "ray", "grpc", "numpy"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_torch_ray_or_grpc_and_only_the_cores_public_modules():
    folder = Path(package.__file__).parent
    modules = sorted(folder.glob("*.py"))
    assert len(modules) >= 5
    for path in modules:
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top in {"kvpool", "services", "workers"} and not name.startswith(
                "services.gateway.http"
            ):
                assert name in ALLOWED_OWN, f"{path.name} imports {name}"
