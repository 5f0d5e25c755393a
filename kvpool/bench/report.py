"""What every `kvpool bench ...` command writes: a JSON file and a PNG plot.

Small on purpose: benchmarks differ in what they measure, not in how they save it. matplotlib
is imported only when a plot is made, with the Agg backend (no display needed).
"""

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def environment() -> dict[str, Any]:
    """Where the figures were measured, to store next to them (these machines are noisy)."""
    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (7.0, 4.0)) -> Any:
    """`(fig, axes)` from `plt.subplots` on the Agg backend; `size` is per panel, in inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_plot(path: Path, fig: Any) -> None:
    """Lay out, write as PNG (creating parent directories) and release `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
