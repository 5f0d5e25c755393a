"""gRPC's fork support is off in every kvpool process before grpc loads (kvpool/__init__.py):
with it on, Ray's GCS server child, forked with a preexec_fn while our gRPC threads were busy,
died before exec and `ray.init` waited out its timeout (3 of 14 `kvpool serve` starts under load).
"""

import os
import subprocess
import sys


def _fork_support_seen_by_a_fresh_process(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    return out.stdout.strip()


def test_loading_a_service_turns_grpc_fork_support_off_before_grpc_loads():
    code = (
        "import sys, os; import services.grpc_server; "
        "print(os.environ['GRPC_ENABLE_FORK_SUPPORT'], 'grpc' in sys.modules)"
    )
    assert _fork_support_seen_by_a_fresh_process(code) == "false True"


def test_an_operators_own_setting_is_kept():
    code = "import os, kvpool.cli; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
    assert _fork_support_seen_by_a_fresh_process(code, GRPC_ENABLE_FORK_SUPPORT="1") == "1"
