"""Top-k routed SwiGLU mixture of experts (spec §7) and the Switch load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.model.config import ModelConfig
from m1jax.model.layers import F32, HIGHEST, dtype_of, param


class RouterStats(NamedTuple):
    """Per-layer sums for the load-balancing loss (padding rows excluded)."""

    prob_sum: jax.Array  # [E] sum over rows of softmax(router logits)
    count: jax.Array  # [E] number of (row, slot) assignments to each expert
    rows: jax.Array  # [] number of rows counted


def route(logits, top_k: int):
    """softmax over all experts (float32) -> top-k -> renormalize. Returns (weights, ids, probs)."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    return top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i, probs


def expert_mlp(x, ids, weights, w1, w3, w2):
    """Dropless grouped SwiGLU: sort the (token, slot) pairs by expert and run ragged matmuls.

    x: [N, D]; ids, weights: [N, k]; w1, w3: [E, D, I]; w2: [E, I, D]. Returns [N, D] float32.
    """
    n, k = ids.shape
    num_experts = w1.shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token]
    h1 = jax.lax.ragged_dot(xs, w1, group_sizes, preferred_element_type=F32)
    h3 = jax.lax.ragged_dot(xs, w3, group_sizes, preferred_element_type=F32)
    h = (jax.nn.silu(h1) * h3).astype(x.dtype)
    y = jax.lax.ragged_dot(h, w2, group_sizes, preferred_element_type=F32)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), F32).at[token].add(y)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, i = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.router = param(rngs, (d, e), ("embed", "experts_unsharded"), F32, std=std)  # fp32 (spec §7.1)
        self.w1 = param(rngs, (e, d, i), ("experts", "embed", "mlp"), pdt, std=std)  # gate
        self.w3 = param(rngs, (e, d, i), ("experts", "embed", "mlp"), pdt, std=std)  # up
        self.w2 = param(rngs, (e, i, d), ("experts", "mlp", "embed"), pdt, std=std)  # down

    def __call__(self, x, mask=None):
        """x: [batch, seq, hidden]; mask: optional [batch, seq]. Returns (y, RouterStats)."""
        cfg = self.cfg
        b, t, d = x.shape
        dt = x.dtype
        xf = x.reshape(b * t, d)
        logits = jnp.dot(xf.astype(F32), self.router[...], precision=HIGHEST)
        weights, ids, probs = route(logits, cfg.num_experts_per_tok)
        y = expert_mlp(
            xf, ids, weights, self.w1[...].astype(dt), self.w3[...].astype(dt), self.w2[...].astype(dt)
        )
        row_w = jnp.ones((b * t,), F32) if mask is None else mask.reshape(-1).astype(F32)
        onehot = jax.nn.one_hot(ids, cfg.num_experts, dtype=F32).sum(axis=1)  # [N, E]
        stats = RouterStats(prob_sum=row_w @ probs, count=row_w @ onehot, rows=row_w.sum())
        return y.astype(dt).reshape(b, t, d), stats


def load_balancing_loss(stats: RouterStats, num_experts: int):
    """Switch aux loss over all layers: E * sum_e F_e * P_e, with F counting every top-k slot.

    stats: RouterStats with a leading layer axis ([L, E], [L, E], [L]).
    """
    rows = jnp.sum(stats.rows)
    f = jnp.sum(stats.count, axis=0) / rows
    p = jnp.sum(stats.prob_sum, axis=0) / rows
    return num_experts * jnp.sum(f * p)
