"""The shape of a model's KV cache, which every stored block must match."""

from dataclasses import dataclass

# dtype names we store and load; keep in sync with torch dtypes by name, not by object, so this
# module (and the block header) need no torch import to compare them.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Layers, KV heads and head dim of a model's cache, and the dtype its attention runs in."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"  # the model's compute dtype, by torch name without "torch."

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"KVGeometry.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}"
            )

    def block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of one block's K and V: [layers, 2, kv_heads, block_tokens, head_dim]."""
        return (self.num_layers, 2, self.num_kv_heads, block_tokens, self.head_dim)

    def values_per_token(self) -> int:
        """K and V elements one token adds to the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token adds to the cache in the model's own dtype."""
        return self.values_per_token() * DTYPE_BYTES[self.dtype]

    @property
    def fp16_bytes_per_token(self) -> int:
        """Bytes per token at 16 bits, the reference for codec compression ratios."""
        return self.values_per_token() * 2
