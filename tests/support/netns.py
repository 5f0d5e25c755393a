"""Run a test scenario in its own network namespace, where it may shape its store's port.

    result = run_scenario("tests.workers.test_plan_link:scenario", timeout_s=600)

The scenario (a function taking no argument and returning a JSON-able value) runs in a child
`python -m tests.support.netns MODULE:FUNCTION` under `unshare -n`, with loopback up; it uses
`kvpool.bench.link.shape_port` to slow its store down. Its value comes back as JSON on the last
line of stdout. The namespace, and all its shaping, is gone when the child exits.
"""

import importlib
import json
import sys
from typing import Any

from kvpool.bench.link import bring_up_loopback, python_isolated

MARK = "SCENARIO-RESULT "


def run_scenario(target: str, timeout_s: float = 600.0) -> Any:
    done = python_isolated(["-m", "tests.support.netns", target], timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise AssertionError(
            f"scenario {target} failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n"
            f"{done.stderr[-8000:]}"
        )
    return json.loads(lines[-1][len(MARK) :])


def main(target: str) -> None:
    bring_up_loopback()
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)()
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
