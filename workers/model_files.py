"""Where the models kvpool names by a short name live on disk; torch-free.

`workers.models` loads them with torch; the vLLM engine's actor (`workers.vllm_worker`) only needs
the folder to hand to vLLM, so it reads the names here and never imports torch.
"""

from pathlib import Path

from kvpool.config import cache_dir

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = ("smollm2-135m", "tiny-random")
# Bump when the conversion itself changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = 1


def smollm2_cache_path() -> Path:
    """The safetensors folder `workers.models.prepare_smollm2` converts the packaged GGUF to."""
    return cache_dir() / "models" / f"smollm2-135m-v{CONVERSION_VERSION}"


def is_prepared(folder: Path) -> bool:
    """True once a conversion into `folder` has finished (its marker is written last)."""
    return (folder / "kvpool.json").is_file()
