"""Slow, obviously-correct references for lightning attention (tests and benchmarks).

``naive`` materializes the full [T, T] decay-masked score matrix (O(T^2) time and memory);
``sequential`` runs the token-by-token recurrence with lax.scan (O(T d^2), no parallelism).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def lightning_attention_naive(q, k, v, decay_rate, initial_state=None):
    """o_t = sum_{tau<=t} lam^(t-tau) (q_t.k_tau) v_tau + lam^(t+1) q_t S0. Shapes as the op."""
    b, t, h, dk = q.shape
    sigma = jnp.asarray(decay_rate, F32)
    pos = jnp.arange(t, dtype=F32)
    diff = pos[:, None] - pos[None, :]
    decay = jnp.where(diff >= 0, jnp.exp(-sigma[:, None, None] * jnp.maximum(diff, 0.0)), 0.0)
    scores = jnp.einsum("bjhd,bthd->bhjt", q, k, preferred_element_type=F32, precision=HIGHEST)
    out = jnp.einsum("bhjt,bthe->bjhe", scores * decay, v.astype(F32), precision=HIGHEST)
    # Final state: S = lam^T S0 + sum_tau lam^(T-1-tau) k_tau^T v_tau.
    w = jnp.exp(-sigma[None, :] * (t - 1.0 - pos[:, None]))  # [T, H]
    state = jnp.einsum("bthd,bthe->bhde", k.astype(F32) * w[None, :, :, None], v.astype(F32), precision=HIGHEST)
    if initial_state is not None:
        s0 = initial_state.astype(F32)
        q_decay = jnp.exp(-sigma[None, :] * (pos[:, None] + 1.0))  # [T, H]
        out = out + jnp.einsum("bjhd,bhde->bjhe", q.astype(F32), s0, precision=HIGHEST) * q_decay[None, :, :, None]
        state = state + jnp.exp(-sigma * t)[None, :, None, None] * s0
    return out.astype(q.dtype), state


def lightning_attention_sequential(q, k, v, decay_rate, initial_state=None):
    """Token-by-token recurrence S_t = lam S_{t-1} + k_t^T v_t, o_t = q_t S_t (lax.scan)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    lam = jnp.exp(-jnp.asarray(decay_rate, F32))[None, :, None, None]
    s0 = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)

    def step(s, x):
        qt, kt, vt = (a.astype(F32) for a in x)  # [B, H, d]
        s = lam * s + kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhd,bhde->bhe", qt, s, precision=HIGHEST)

    xs = tuple(a.transpose(1, 0, 2, 3) for a in (q, k, v))
    state, out = jax.lax.scan(step, s0, xs)
    return out.transpose(1, 0, 2, 3).astype(q.dtype), state
