"""Shared building blocks: parameter creation, RMSNorm, rotary embeddings, dtype helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, std: float | None = None, ones: bool = False):
    """An nnx.Param with logical axis names in its ``axes`` metadata (mapped to a mesh by sharding rules).

    ``std``: normal(0, std) init; ``ones``: ones (norm weights).
    """
    assert len(axes) == len(shape), (shape, axes)
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def rms_norm(x, weight, eps: float):
    """w * cast_back(x32 / sqrt(mean(x32^2) + eps)) over the last axis (spec §4.1)."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype, axis_name: str = "embed"):
        self.weight = param(None, (size,), (axis_name,), param_dtype, ones=True)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def rope_inv_freq(rotary_dim: int, theta: float):
    """inv_freq_i = theta^(-2i/rotary_dim), i < rotary_dim/2, computed in float32 as the references do."""
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=F32) / rotary_dim))


def apply_rope(x, positions, rotary_dim: int, theta: float):
    """Rotate-half (NeoX) RoPE on the first ``rotary_dim`` channels of each head; the rest pass.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] integer.
    """
    if rotary_dim == 0:
        return x
    angles = positions.astype(F32)[..., None] * rope_inv_freq(rotary_dim, theta)  # [B, T, r/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated
