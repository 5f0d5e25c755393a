"""The committed stubs in kvpool/v1 are exactly what proto/generate.sh makes from the .protos."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
STUBS = ROOT / "kvpool" / "v1"


def test_stubs_are_not_stale(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["sh", str(ROOT / "proto" / "generate.sh"), str(tmp_path)], env=env, check=True)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "kvpool" / "v1").iterdir()}
    protos = sorted(p.stem for p in (ROOT / "proto" / "kvpool" / "v1").glob("*.proto"))
    assert protos and "store" in protos
    for stem in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"{stem}{suffix}" in fresh
    for name, content in fresh.items():
        committed = STUBS / name
        assert committed.exists(), f"{name} is missing: run make proto"
        assert committed.read_bytes() == content, f"{name} is stale: run make proto"
    handwritten = {p.name for p in STUBS.iterdir() if p.is_file()} - set(fresh) - {"__init__.py"}
    assert not handwritten, f"only generated code belongs in kvpool/v1: {handwritten}"
