"""Deterministic KV blocks for the tests (no RNG, so golden bytes are the same on any CPU)."""

import math

import torch


def fixed_block(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[L, 2, H, T, D]: multiples of 1/256 in [-4, 4] (exact in every float dtype we store),
    with key channel 3 eight times larger, like the outlier channels real keys have."""
    n = math.prod(shape)
    codes = (torch.arange(n, dtype=torch.int64) * 7919) % 2001 - 1000  # [n] in [-1000, 1000]
    kv = (codes.to(torch.float32) / 256.0).view(shape)  # [L, 2, H, T, D]
    if shape[4] > 3:
        kv[:, 0, :, :, 3] *= 8
    return kv.to(dtype)


def seeded_block(
    shape: tuple[int, int, int, int, int], seed: int, magnitude: float, kind: str
) -> torch.Tensor:
    """[L, 2, H, T, D] float32 from a seed: kind is normal, zeros, constant or outliers."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, magnitude * 0.37)
    kv = (torch.rand(shape, generator=generator) * 2 - 1) * magnitude  # [L, 2, H, T, D]
    if kind == "outliers":
        kv[:, 0, :, :, 0] *= 3  # an outlier key channel
        kv[:, 1, :, 0, :] *= 3  # an outlier value token
    return kv
