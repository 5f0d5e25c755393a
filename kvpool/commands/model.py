"""`kvpool model prepare NAME`: load a model once so later loads are fast.

For `smollm2-135m` this converts the packaged GGUF to safetensors under KVPOOL_CACHE_DIR; for a
hub id it fills the Hugging Face cache. Container images run it at build time so that containers
never need a hub.
"""

import argparse
import json

from workers.api import WorkerConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=WorkerConfig().model, help="model to prepare")


def run(args: argparse.Namespace) -> int:
    from workers.models import load_model

    loaded = load_model(args.name, device="cpu")
    geometry = loaded.geometry
    print(
        json.dumps(
            {
                "model": loaded.name,
                "fingerprint": loaded.fingerprint,
                "layers": geometry.num_layers,
                "kv_heads": geometry.num_kv_heads,
                "head_dim": geometry.head_dim,
                "dtype": geometry.dtype,
                "fp16_bytes_per_token": geometry.fp16_bytes_per_token,
                "max_context": loaded.max_context,
            }
        )
    )
    return 0
