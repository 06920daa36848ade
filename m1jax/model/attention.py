"""Softmax GQA attention with partial rotary embeddings (spec §6)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.model.config import ModelConfig
from m1jax.model.layers import F32, apply_rope, dtype_of, param


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.q = param(rngs, (d, hd), ("embed", "heads_x_dim"), pdt, std=std)
        self.k = param(rngs, (d, kvd), ("embed", "kv_heads_x_dim"), pdt, std=std)
        self.v = param(rngs, (d, kvd), ("embed", "kv_heads_x_dim"), pdt, std=std)
        self.o = param(rngs, (hd, d), ("heads_x_dim", "embed"), pdt, std=std)

    def __call__(self, a, positions, mask=None):
        """a: [batch, seq, hidden]; positions: [batch, seq]; mask: optional [batch, seq] key mask.

        Causal; query head h uses kv head h // (heads / kv_heads). Scores and softmax in float32.
        """
        cfg = self.cfg
        b, t, _ = a.shape
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = a.dtype
        q = (a @ self.q[...].astype(dt)).reshape(b, t, h, d)
        k = (a @ self.k[...].astype(dt)).reshape(b, t, kv, d)
        v = (a @ self.v[...].astype(dt)).reshape(b, t, kv, d)
        q = apply_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        q = q.reshape(b, t, kv, h // kv, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) / math.sqrt(d)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
        if mask is not None:
            allowed = allowed & (mask[:, None, None, None, :] > 0)
        scores = jnp.where(allowed, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)
        return o @ self.o[...].astype(dt)
