"""XLA:CPU implementations, kept out of the model's main path: the MoE's expert strategies for
``moe_impl="auto"`` when compiled for CPU (``moe.MoE`` picks them with ``jax.lax.platform_dependent``;
GPU/TPU take the grouped ``ragged_dot``), and the one-query decode dots of the softmax layers' cache.

Each computes the same values as the plain form it replaces (tests/test_model.py); the layouts
and splits are what XLA:CPU runs fast. Measurements: docs/rollout.md.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from m1jax.model.layers import F32

# ---------------------------------------------------------------------------------- MoE experts

def _gate(ids, weights, num_experts: int):
    """Routing weights as a dense [N, E] float32 matrix (0 for the experts a row does not use)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], num_experts), F32).at[rows, ids].add(weights.astype(F32))


def _expert_hidden(xs, gs, w1, w3):
    """SwiGLU hidden rows of every expert, scaled by their routing weights: xs [E, R, D] (expert e's
    rows), gs [E, R]. Returns [E, R, I] in xs.dtype, ready for the down projection."""
    h1 = jnp.einsum("erd,edi->eri", xs, w1, preferred_element_type=F32)
    h3 = jnp.einsum("erd,edi->eri", xs, w3, preferred_element_type=F32)
    return (jax.nn.silu(h1) * h3 * gs[:, :, None]).astype(xs.dtype)


def expert_mlp_dense(x, ids, weights, w1, w3, w2):
    """Every expert on every token, summed with the routing weights (0 for unselected experts):
    x [N, D]; ids, weights [N, k]. Returns [N, D] float32 — equal to ``expert_mlp``.

    Written as dots batched over the expert axis, which read w1/w3 [E, D, I] and w2 [E, I, D] in
    their stored layout. ("nd,edi->eni" instead makes XLA:CPU merge the experts into one
    [D, E*I] matmul and transpose the weights into it on every call: inside the decode loop that
    was half of a step.)
    """
    e = w1.shape[0]
    h = _expert_hidden(jnp.broadcast_to(x, (e, *x.shape)), _gate(ids, weights, e).T, w1, w3)
    return jnp.einsum("eni,eid->nd", h, w2, preferred_element_type=F32)


def expert_mlp_slots(x, ids, weights, w1, w3, w2, capacity: int):
    """Every expert computes ``capacity`` row slots, filled with its tokens in order (empty slots
    hold a zero row): the work of E * capacity rows instead of dense's E * N. x [N, D]; ids,
    weights [N, k]. Equal to ``expert_mlp`` when no expert has more than ``capacity`` tokens —
    the caller's guarantee (rows past it would be dropped)."""
    n, d = x.shape
    e = w1.shape[0]
    rows = jnp.arange(n)[:, None]
    hit = jnp.zeros((n, e), bool).at[rows, ids].set(True)  # top-k ids are distinct per row
    gate = _gate(ids, weights, e)
    slot = jnp.where(hit, jnp.cumsum(hit, axis=0) - 1, capacity)  # slot `capacity` = not routed here
    token = jnp.full((e, capacity + 1), n, jnp.int32).at[jnp.arange(e), slot].set(
        jnp.broadcast_to(rows.astype(jnp.int32), (n, e)), mode="drop")[:, :capacity]  # [E, C]; n = empty
    xs = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token]  # [E, C, D]
    gs = jnp.concatenate([gate, jnp.zeros((1, e), F32)])[token, jnp.arange(e)[:, None]]  # [E, C]
    y = jnp.einsum("eci,eid->ecd", _expert_hidden(xs, gs, w1, w3), w2, preferred_element_type=F32)
    return jnp.zeros((n + 1, d), F32).at[token].add(y)[:n]


def expert_mlp_gathered(x, ids, weights, w1, w3, w2):
    """Each (token, expert) pair with its expert's matrices gathered: reads the weights of the n * k
    selected experts only, where the batched forms read all E. x [N, D]; ids, weights [N, k].
    Returns [N, D] float32 — equal to ``expert_mlp``. Pays off when n * k < E (batch-1 decode).
    Measurements: docs/rollout.md."""
    n, k = ids.shape
    pair = ids.reshape(-1)
    xs = jnp.repeat(x, k, axis=0)[:, None]  # [N k, 1, D]: pair i * k + j is token i for its j-th expert
    h = _expert_hidden(xs, weights.reshape(-1, 1).astype(F32), w1[pair], w3[pair])  # each pair its own "expert"
    y = jnp.einsum("pri,pid->prd", h, w2[pair], preferred_element_type=F32)
    return y.reshape(n, k, -1).sum(axis=1)


_BATCH_INVARIANT = contextvars.ContextVar("m1jax_moe_batch_invariant", default=False)


@contextlib.contextmanager
def batch_invariant():
    """While tracing inside this context, the CPU experts pick their implementation from shapes
    alone, so that a row's output never depends on the other rows of its batch: the slot engine's
    guarantee that a sample is the same whichever slots and neighbours it ran with. (Outside it,
    ``expert_mlp_cpu`` chooses fixed slots or dense by whether the batch's loads fit the slots:
    both exact, but not bitwise equal, so a row's last bits depended on its neighbours' routing.)"""
    token = _BATCH_INVARIANT.set(True)
    try:
        yield
    finally:
        _BATCH_INVARIANT.reset(token)


def batch_invariant_now() -> bool:
    """Whether the trace being built is inside ``batch_invariant()``."""
    return _BATCH_INVARIANT.get()


def expert_mlp_cpu(x, ids, weights, w1, w3, w2, invariant: bool = False):
    """The CPU experts, dropless, one compiled program per shape:

    * fewer (token, expert) pairs than experts (small-batch decode): only the selected experts'
      weights, gathered (``expert_mlp_gathered``);
    * otherwise fixed slots of 1.5x the balanced load (``expert_mlp_slots``) when every expert's
      tokens fit them, else dense. With E experts and top-k routing the slots do 1.5 k / E of
      dense's work (tiny config: 3/4). ``invariant`` (``batch_invariant()``): dense."""
    n, e, k = x.shape[0], w1.shape[0], ids.shape[1]
    if n * k < e:
        return expert_mlp_gathered(x, ids, weights, w1, w3, w2)
    if invariant:
        return expert_mlp_dense(x, ids, weights, w1, w3, w2)
    balanced = -(-n * k // e)  # ceil(n k / e)
    capacity = -(-3 * balanced // 2 // 8) * 8  # 1.5x, rounded up to a multiple of 8 rows
    if capacity >= n:  # small batches: slots would not save anything
        return expert_mlp_dense(x, ids, weights, w1, w3, w2)
    fits = jnp.max(jnp.zeros((e,), jnp.int32).at[ids.reshape(-1)].add(1)) <= capacity
    return jax.lax.cond(fits, lambda: expert_mlp_slots(x, ids, weights, w1, w3, w2, capacity),
                        lambda: expert_mlp_dense(x, ids, weights, w1, w3, w2))


# ------------------------------------------------------------------- decode attention (one query)

def _bf16_parts(x):
    """x (float32) as three bfloat16 parts that sum to it exactly (8 + 8 + 8 significant bits),
    stacked on axis 2: a dot of the parts with bfloat16 operands and float32 sums equals x's float32
    dot. Each part is the rest with its low 16 bits cleared, not rounded: XLA folds a float32 ->
    bfloat16 -> float32 round trip back to x (excess precision), which would zero the rest."""
    top = lambda y: jax.lax.bitcast_convert_type(  # noqa: E731
        jax.lax.bitcast_convert_type(y, jnp.uint32) & jnp.uint32(0xFFFF0000), F32)
    hi = top(x)
    mid = top(x - hi)
    return jnp.concatenate([hi, mid, x - hi - mid], axis=2).astype(jnp.bfloat16)


def _parts_sum(x):
    g = x.shape[2] // 3
    return x[:, :, :g] + x[:, :, g:2 * g] + x[:, :, 2 * g:]


def decode_dot(q1, keys):
    """Scores of one query per row, q1 [B, KV, G, d], against keys [B, KV, S, d]: [B, KV, G, S] f32.

    A bfloat16 cache is read as is, not converted to float32 first (XLA:CPU materializes that
    convert: a second pass over the cache); a float32 query goes in as three bfloat16 parts
    (``_bf16_parts``), so the scores equal float32 dots."""
    if keys.dtype != jnp.bfloat16:
        return jnp.einsum("bkgd,bksd->bkgs", q1.astype(F32), keys.astype(F32))
    if q1.dtype == keys.dtype:
        return jnp.einsum("bkgd,bksd->bkgs", q1, keys, preferred_element_type=F32)
    return _parts_sum(jnp.einsum("bkgd,bksd->bkgs", _bf16_parts(q1.astype(F32)), keys, preferred_element_type=F32))


def decode_mix(w, values):
    """Softmax weights w [B, KV, G, S] (float32) times values [B, KV, S, d]: [B, KV, G, d] float32.

    The sum over S runs as a batch of dots over column blocks, added after (XLA:CPU runs one long dot
    over S far slower). The block sums pass an optimization barrier, which keeps XLA:CPU from fusing
    the dots with the sum into a slower loop. For a bfloat16 cache, w goes in as three bfloat16 parts
    (``_bf16_parts``). Measurements: docs/rollout.md."""
    b, kv, _, s = w.shape
    block = next((c for c in (256, 128, 64, 32, 16) if s % c == 0), s)
    parts = values.dtype == jnp.bfloat16
    out = jnp.einsum("bkgjc,bkjcd->bkjgd", (_bf16_parts(w) if parts else w).reshape(b, kv, -1, s // block, block),
                     values.reshape(b, kv, s // block, block, -1), preferred_element_type=F32)
    out = jax.lax.optimization_barrier(out).sum(axis=2)
    return _parts_sum(out) if parts else out
