"""Lightning attention in pure jax.numpy: the chunked (blockwise) form and the decode step.

The operator, per batch element and head, with decay ``lam = exp(-sigma)``::

    o_t = sum_{tau <= t} lam^(t - tau) (q_t . k_tau) v_tau

Recurrent form (state ``S`` is ``[d_k, d_v]``, key channel first)::

    S_t = lam * S_{t-1} + k_t^T v_t ,    o_t = q_t S_t

Chunked form over blocks of ``m`` tokens entering with state ``S`` (local indices j, t < m)::

    O_intra[j] = sum_{t <= j} lam^(j - t) (q_j . k_t) v_t
    O_inter[j] = lam^(j + 1) q_j S
    S_next     = lam^m S + sum_t lam^(m - 1 - t) k_t^T v_t

This is exact in exact arithmetic for any block size; the block size only changes rounding.
Sequences that are not a multiple of the block are handled by one shorter final block (no padding,
so the final state is never over-decayed). All accumulation and the state are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _block(state, q, k, v, sigma, m: int):
    """One block of m tokens. q, k: [B, H, m, dk]; v: [B, H, m, dv]; state: [B, H, dk, dv] f32.

    sigma: [H] f32. Returns (state_next, out [B, H, m, dv] f32).
    """
    idx = jnp.arange(m, dtype=F32)
    sig = sigma[:, None]  # [H, 1]
    diff = idx[:, None] - idx[None, :]  # [m, m], j - t
    # exp of a clamped exponent so that neither the value nor its gradient sees exp(+large).
    intra_decay = jnp.where(diff >= 0, jnp.exp(-sig[:, :, None] * jnp.maximum(diff, 0.0)), 0.0)  # [H,m,m]
    scores = jnp.einsum("bhjd,bhtd->bhjt", q, k, preferred_element_type=F32, precision=HIGHEST)
    o_intra = jnp.einsum("bhjt,bhte->bhje", scores * intra_decay, v.astype(F32), precision=HIGHEST)
    q_decay = jnp.exp(-sig * (idx + 1.0))  # [H, m]
    o_inter = jnp.einsum("bhjd,bhde->bhje", q.astype(F32), state, precision=HIGHEST)
    out = o_intra + o_inter * q_decay[None, :, :, None]
    k_decay = jnp.exp(-sig * (m - 1.0 - idx))  # [H, m]
    kv = jnp.einsum(
        "bhtd,bhte->bhde", k.astype(F32) * k_decay[None, :, :, None], v.astype(F32), precision=HIGHEST
    )
    state = jnp.exp(-sigma * m)[None, :, None, None] * state + kv
    return state, out


def lightning_attention_xla(q, k, v, decay_rate, initial_state=None, *, block_size: int = 256):
    """Chunked lightning attention.

    Args:
      q, k: [batch, seq, heads, d_k]; v: [batch, seq, heads, d_v] (any float dtype).
      decay_rate: sigma, [heads] (the decay per token is exp(-sigma)).
      initial_state: optional [batch, heads, d_k, d_v] (float32), the state before token 0.
      block_size: tokens per block (static).

    Returns:
      out [batch, seq, heads, d_v] in q.dtype, final_state [batch, heads, d_k, d_v] float32.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    sigma = jnp.asarray(decay_rate, F32)
    state = jnp.zeros((b, h, dk, dv), F32) if initial_state is None else initial_state.astype(F32)
    if t == 0:
        return jnp.zeros((b, 0, h, dv), q.dtype), state
    bs = min(block_size, t)
    n_full, rem = divmod(t, bs)

    def heads_first(x, n, m):  # [B, n*m, H, d] -> [n, B, H, m, d]
        return x.reshape(b, n, m, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    outs = []
    if n_full:
        xs = tuple(heads_first(x[:, : n_full * bs], n_full, bs) for x in (q, k, v))

        @jax.checkpoint
        def step(s, blk):
            return _block(s, *blk, sigma, bs)

        state, o = jax.lax.scan(step, state, xs)  # o: [n, B, H, bs, dv]
        outs.append(o.transpose(1, 0, 3, 2, 4).reshape(b, n_full * bs, h, dv))
    if rem:
        tail = tuple(x[:, n_full * bs :].transpose(0, 2, 1, 3) for x in (q, k, v))
        state, o = _block(state, *tail, sigma, rem)
        outs.append(o.transpose(0, 2, 1, 3))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.astype(q.dtype), state


def lightning_decode_xla(q, k, v, decay_rate, state):
    """One recurrent step per sequence: S <- lam S + k^T v ; o = q S.

    q, k: [batch, heads, d_k]; v: [batch, heads, d_v]; state [batch, heads, d_k, d_v] float32.
    Returns (out [batch, heads, d_v] in q.dtype, new_state float32).
    """
    lam = jnp.exp(-jnp.asarray(decay_rate, F32))[None, :, None, None]
    kv = k.astype(F32)[..., :, None] * v.astype(F32)[..., None, :]
    new_state = lam * state.astype(F32) + kv
    out = jnp.einsum("bhd,bhde->bhe", q.astype(F32), new_state, precision=HIGHEST)
    return out.astype(q.dtype), new_state
