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

    def __call__(self, a, positions, mask=None, kv_cache=None, cache_index=None, key_valid=None):
        """a: [batch, seq, hidden]; positions: [batch, seq] (RoPE); mask: optional [batch, seq] key mask.

        Without a cache: causal attention over the seq tokens. With ``kv_cache`` = (k, v), each
        [batch, kv_heads, max_len, head_dim]: the new keys/values are written at ``cache_index`` and
        the queries attend to every cached key that ``key_valid`` [batch, max_len] marks, causally.
        Returns (out [batch, seq, hidden], new kv_cache or None). Query head h uses kv head
        h // (heads / kv_heads). Scores and softmax in float32.
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
        if kv_cache is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, d]
            allowed = jnp.tril(jnp.ones((t, t), bool))[None, None, None]
            if mask is not None:
                allowed = allowed & (mask[:, None, None, None, :] > 0)
            new_cache = None
        else:
            kc, vc = kv_cache
            at = (0, 0, cache_index, 0)
            keys = jax.lax.dynamic_update_slice(kc, k.transpose(0, 2, 1, 3).astype(kc.dtype), at)
            values = jax.lax.dynamic_update_slice(vc, v.transpose(0, 2, 1, 3).astype(vc.dtype), at)
            s_idx = jnp.arange(kc.shape[2])
            causal = s_idx[None, :] <= cache_index + jnp.arange(t)[:, None]  # [T, L]
            allowed = causal[None, None, None] & (key_valid[:, None, None, None, :] > 0)
            new_cache = (keys, values)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(dt), preferred_element_type=F32) / math.sqrt(d)
        scores = jnp.where(allowed, scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o = jnp.einsum("bkgts,bksd->btkgd", probs, values.astype(dt)).reshape(b, t, h * d)
        return o @ self.o[...].astype(dt), new_cache
