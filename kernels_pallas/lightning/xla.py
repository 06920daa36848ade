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


def _decay_factors(sigma, m: int):
    """Decay tables for a block of m tokens (loop-invariant: computed once, outside the scan).

    Returns intra [H, m, m] (lam^(j-t) on and below the diagonal), q_decay [H, m] (lam^(j+1)),
    k_decay [H, m] (lam^(m-1-t)) and block_decay [H] (lam^m).
    """
    idx = jnp.arange(m, dtype=F32)
    sig = sigma[:, None]  # [H, 1]
    diff = idx[:, None] - idx[None, :]  # [m, m], j - t
    # exp of a clamped exponent so that neither the value nor its gradient sees exp(+large).
    intra = jnp.where(diff >= 0, jnp.exp(-sig[:, :, None] * jnp.maximum(diff, 0.0)), 0.0)
    return intra, jnp.exp(-sig * (idx + 1.0)), jnp.exp(-sig * (m - 1.0 - idx)), jnp.exp(-sigma * m)


def _block(state, q, k, v, factors):
    """One block, batch and heads merged into one axis G = B*H (plain batched matmuls are what
    XLA:CPU runs fastest). q, k: [G, m, dk]; v: [G, m, dv]; state: [G, dk, dv] f32;
    factors: the _decay_factors tables tiled to G. Returns (state_next, out [G, m, dv] f32).
    """
    intra, q_decay, k_decay, block_decay = factors
    mm = lambda a, b: jnp.matmul(a, b, precision=HIGHEST, preferred_element_type=F32)  # noqa: E731
    q32, k32, v32 = q.astype(F32), k.astype(F32), v.astype(F32)
    scores = mm(q, k.swapaxes(1, 2)) * intra
    out = mm(scores, v32) + q_decay[:, :, None] * mm(q32, state)
    state = block_decay[:, None, None] * state + mm((k32 * k_decay[:, :, None]).swapaxes(1, 2), v32)
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
    state = state.reshape(b * h, dk, dv)
    bs = min(block_size, t)
    n_full, rem = divmod(t, bs)

    def tiled(m):  # decay tables for blocks of m tokens, tiled over the batch: [B*H, ...]
        return tuple(jnp.tile(f, (b,) + (1,) * (f.ndim - 1)) for f in _decay_factors(sigma, m))

    # Blocks are sliced along the sequence in the input layout ([n, B, m, H, d]; free for B = 1)
    # and transposed to [B*H, m, d] inside the loop, so every transpose stays in cache.
    def seq_blocks(x, n, m):  # [B, n*m, H, d] -> [n, B, m, H, d]
        return x.reshape(b, n, m, h, x.shape[-1]).swapaxes(0, 1)

    def heads_first(x):  # [B, m, H, d] -> [B*H, m, d]
        return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[-1])

    def seq_first(o):  # [B*H, m, dv] -> [B, m, H, dv]
        return o.reshape(b, h, o.shape[1], dv).transpose(0, 2, 1, 3)

    outs = []
    if n_full:
        factors = tiled(bs)
        xs = tuple(seq_blocks(x[:, : n_full * bs], n_full, bs) for x in (q, k, v))

        @jax.checkpoint
        def step(s, blk):
            s, o = _block(s, *(heads_first(x) for x in blk), factors)
            return s, seq_first(o)

        state, o = jax.lax.scan(step, state, xs)  # o: [n, B, bs, H, dv]
        outs.append(o.swapaxes(0, 1).reshape(b, n_full * bs, h, dv))
    if rem:
        state, o = _block(state, *(heads_first(x[:, n_full * bs :]) for x in (q, k, v)), tiled(rem))
        outs.append(seq_first(o))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.astype(q.dtype), state.reshape(b, h, dk, dv)


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
