"""Sequence-parallel lightning attention: the per-shard combine, run inside a ``shard_map`` whose
sequence axis splits the tokens into ``n`` contiguous shards of ``L`` tokens each.

Each shard runs the chunked operator (Pallas or XLA) on its own tokens from a zero state, giving
``o_loc`` and its local final state ``S_j``. With decay ``lam = exp(-sigma)``, the state entering
shard ``i`` is the decayed exclusive prefix of the shards before it, plus the initial state::

    S_in(i) = sum_{j < i} lam^((i - 1 - j) L) S_j  +  lam^(i L - pad) S_0

and its token ``u`` (local index) adds the inter-shard term ``lam^(u + 1) q_u S_in(i)``. The final
state is ``S_in(n)``. The ``pad`` tokens before the first real one (front padding of a length the
axis does not divide) are zeros: they add nothing to any state, and ``S_0`` starts decaying at the
first real token. The states travel by one all-gather of ``[n, batch, heads, d_k, d_v]`` float32
(the shards' tokens never move); the backward is autodiff through it (a reduce-scatter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def combine_sequence_shards(q, out, state, decay_rate, initial_state, *, axis_name: str, pad: int = 0):
    """The shard's output and the sequence's final state, from its local pass.

    q: [batch, L, heads, d_k] this shard's queries; out: [batch, L, heads, d_v] and state
    [batch, heads, d_k, d_v] the local pass from a zero state; decay_rate: sigma [heads];
    initial_state: [batch, heads, d_k, d_v] float32 or None; pad: zero tokens in front of the first
    real one (global).

    Returns (out [batch, L, heads, d_v] in out.dtype, final state float32, equal on every shard).
    """
    n = jax.lax.axis_size(axis_name)
    i = jax.lax.axis_index(axis_name)
    length = q.shape[1]
    sigma = jnp.asarray(decay_rate, F32)
    states = jax.lax.all_gather(state.astype(F32), axis_name)  # [n, B, H, dk, dv]
    j = jnp.arange(n)

    def prefix(upto):  # sum_{j < upto} lam^((upto - 1 - j) L) S_j  +  lam^(upto L - pad) S_0
        steps = jnp.maximum(upto - 1 - j, 0).astype(F32) * length  # [n], clamped: no exp(+x) for j >= upto
        w = jnp.where((j < upto)[:, None], jnp.exp(-sigma[None, :] * steps[:, None]), 0.0)  # [n, H]
        s = jnp.einsum("jh,jbhde->bhde", w, states, precision=HIGHEST)
        if initial_state is not None:
            # upto L - pad < 0 only for upto = 0, whose first `pad` queries are zeros (lam^-pad is finite)
            decay = jnp.exp(-sigma * jnp.asarray(upto * length - pad, F32))[None, :, None, None]
            s = s + decay * initial_state.astype(F32)
        return s

    s_in = prefix(i)
    q_decay = jnp.exp(-sigma[None, :] * (jnp.arange(length, dtype=F32)[:, None] + 1.0))  # [L, H]
    inter = jnp.einsum("blhd,bhde->blhe", q.astype(F32), s_in, precision=HIGHEST) * q_decay[None, :, :, None]
    return (out.astype(F32) + inter).astype(out.dtype), prefix(n)
