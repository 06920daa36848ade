"""Top-k routed SwiGLU mixture of experts (spec §7) and the Switch load-balancing loss."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax.model import cpu
from m1jax.model.config import ModelConfig
from m1jax.model.layers import F32, HIGHEST, dtype_of, param


class RouterStats(NamedTuple):
    """Per-layer sums for the load-balancing loss (padding rows excluded)."""

    prob_sum: jax.Array  # [E] sum over rows of softmax(router logits)
    count: jax.Array  # [E] number of (row, slot) assignments to each expert
    rows: jax.Array  # [] number of rows counted
    expert_ids: jax.Array  # [N, top_k] int32: the routing of every token (for routing replay)


def route(logits, top_k: int, forced_ids=None):
    """softmax over all experts (float32) -> top-k -> renormalize. Returns (weights, ids, probs).

    forced_ids [N, top_k] (routing replay): these experts instead of the top-k, weighted by their
    renormalized probabilities (R3: the sampler's choice, the trainer's gate values and gradient)."""
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    if forced_ids is None:
        top_p, top_i = jax.lax.top_k(probs, top_k)
    else:
        top_i = forced_ids.astype(jnp.int32)
        top_p = jnp.take_along_axis(probs, top_i, axis=-1)
    return top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i, probs


def _gather_rows(x, idx):
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(x, idx, inv):
    """x[idx]: rows of x [N, ...] by idx [R] (an index >= N gives a zero row), for an injective
    map (no two entries of idx name the same row) whose inverse is ``inv`` [N] (row i of x went to
    output row inv[i], or nowhere when inv[i] >= R).

    The backward pass is the gather by ``inv``, not the scatter-add that autodiff of a gather
    makes: XLA:TPU expands a row scatter into several [rows, D] index and mask buffers, which were
    the largest temporaries of a long-sequence MoE step."""
    return _gather_rows(x, idx)


def _take_rows_fwd(x, idx, inv):
    return _gather_rows(x, idx), (idx, inv)


def _take_rows_bwd(res, g):
    _, inv = res
    return _gather_rows(g, inv), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def grouped_swiglu(x, expert, w1, w3, w2, row_weights=None, out_dtype=F32):
    """Rows x [R, D], each for expert ``expert`` [R]: sort by expert, ragged matmuls, unsort.

    w1, w3: [E, D, I]; w2: [E, I, D]. ``row_weights`` [R] (float32) scales each row's output.
    Returns [R, D] in out_dtype, float32 sums (dropless: every row is computed).
    """
    order = jnp.argsort(expert, stable=True)
    inv = jnp.argsort(order)
    group_sizes = jnp.bincount(expert, length=w1.shape[0]).astype(jnp.int32)
    xs = take_rows(x, order, inv)
    h1 = jax.lax.ragged_dot(xs, w1, group_sizes, preferred_element_type=F32)
    h3 = jax.lax.ragged_dot(xs, w3, group_sizes, preferred_element_type=F32)
    h = (jax.nn.silu(h1) * h3).astype(x.dtype)
    y = jax.lax.ragged_dot(h, w2, group_sizes, preferred_element_type=F32)
    if row_weights is not None:
        y = y * row_weights[order][:, None]
    return take_rows(y.astype(out_dtype), inv, order)


def expert_mlp(x, ids, weights, w1, w3, w2):
    """Dense single-device MoE: x [N, D]; ids, weights [N, k]. Returns [N, D] float32."""
    n, k = ids.shape
    y = grouped_swiglu(jnp.repeat(x, k, axis=0), ids.reshape(-1), w1, w3, w2, weights.reshape(-1))
    return y.reshape(n, k, -1).sum(axis=1)  # a token's k (token, expert) pairs are adjacent


def _router_stats(probs, ids, row_w, num_experts):
    onehot = jax.nn.one_hot(ids, num_experts, dtype=F32).sum(axis=1)  # [N, E]
    return RouterStats(prob_sum=row_w @ probs, count=row_w @ onehot, rows=row_w.sum(), expert_ids=ids.astype(jnp.int32))


def moe_expert_parallel(x, mask, router, w1, w3, w2, top_k: int, capacity_factor: float | None, chunk: int = 0,
                        expert_ids=None):
    """MoE over the current mesh with jax.shard_map: tokens go to the devices owning their experts
    with an all_to_all over "expert", are computed there (MLP width split over "tensor", partial
    sums psum'ed) and come back with a second all_to_all.

    Each device sends every other expert shard a buffer of ``cap`` rows: n*k (dropless, the default:
    nothing can overflow) or ceil(n*k/ep * capacity_factor) (rows past it are dropped, weight 0),
    for its n tokens or, with ``chunk``, for each chunk of at most ``chunk`` of them in turn.
    x: [B, T, D] sharded over the batch axes and, on a mesh with a sequence axis, T over it (its
    shards' tokens are just more rows; a length it does not divide gets masked padding rows at the
    end); mask [B, T]; expert_ids optional [B, T, top_k] (routing replay, see ``route``). Returns
    (y [B, T, D], RouterStats summed over all devices).
    """
    from m1jax import sharding as shd

    mesh = shd.current_mesh()
    bax = shd.batch_axes(mesh)
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    num_experts, _, inter = w1.shape
    e_loc = num_experts // ep
    mlp = "tensor" if tp > 1 and inter % tp == 0 else None
    bspec = shd.batch_spec(mesh)
    seq = shd.sequence_shards(mesh)
    sspec = "sequence" if seq > 1 else None
    stat_axes = bax + (("sequence",) if sspec else ())
    t_in = x.shape[1]
    if t_in % seq:
        x = jnp.pad(x, ((0, 0), (0, -t_in % seq), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, -t_in % seq)))
        if expert_ids is not None:
            expert_ids = jnp.pad(expert_ids, ((0, 0), (0, -t_in % seq), (0, 0)))

    def dispatch(xf, ids, weights, real, w1, w3, w2):
        """Tokens xf [n, D] with their routing ids, weights [n, k] (rows where ``real`` is False are
        dropped) to their experts' devices, through the experts and back: [n, D] float32."""
        n = xf.shape[0]
        cap = n * top_k if capacity_factor is None else max(1, math.ceil(n * top_k / ep * capacity_factor))
        pairs = n * top_k  # (token, expert) pair p is token p // top_k; a token's pairs are adjacent
        dest = (ids // e_loc).reshape(-1)  # [pairs] destination expert shard
        pos = jnp.take_along_axis(jnp.cumsum(jax.nn.one_hot(dest, ep, dtype=jnp.int32), 0) - 1, dest[:, None], 1)[:, 0]
        keep = (pos < cap) & jnp.repeat(real, top_k)
        slot = jnp.where(keep, dest * cap + pos, ep * cap)  # [pairs] -> send slot (ep * cap: dropped)
        src = jnp.full((ep * cap,), pairs, jnp.int32).at[slot].set(jnp.arange(pairs, dtype=jnp.int32), mode="drop")
        fill = lambda a: jnp.take(a.reshape(-1), src, mode="fill", fill_value=0).reshape(ep, cap)  # noqa: E731
        send_x = take_rows(jnp.repeat(xf, top_k, axis=0), src, slot).reshape(ep, cap, -1)
        recv_x, recv_e, recv_w = (jax.lax.all_to_all(a, "expert", 0, 0)
                                  for a in (send_x, fill(ids % e_loc), fill(weights)))
        # Each row comes back scaled by its routing weight, in the compute dtype: the tensor psum and
        # the return all_to_all move [ep * cap, D] in bf16, not float32.
        y = grouped_swiglu(recv_x.reshape(ep * cap, -1), recv_e.reshape(-1), w1, w3, w2, recv_w.reshape(-1),
                           out_dtype=xf.dtype)
        if mlp:
            y = jax.lax.psum(y, "tensor")
        back = jax.lax.all_to_all(y.reshape(ep, cap, -1), "expert", 0, 0)
        rows = take_rows(back.reshape(ep * cap, -1), slot, src)  # [pairs, D]; dropped pairs are 0
        return jnp.sum(rows.reshape(n, top_k, -1), axis=1, dtype=F32)

    def local(x, mask, router, w1, w3, w2, forced=None):
        b, t, d = x.shape
        n = b * t
        xf = x.reshape(n, d)
        logits = jnp.dot(xf.astype(F32), router, precision=HIGHEST)
        weights, ids, probs = route(logits, top_k, None if forced is None else forced.reshape(n, top_k))
        stats = _router_stats(probs, ids, mask.reshape(-1).astype(F32), num_experts)
        if stat_axes:  # global sums; the per-token routing stays sharded like the tokens
            stats = stats._replace(**{f: jax.lax.psum(getattr(stats, f), stat_axes)
                                      for f in ("prob_sum", "count", "rows")})
        stats = stats._replace(expert_ids=stats.expert_ids.reshape(b, t, top_k))
        if not chunk or n <= chunk:
            out = dispatch(xf, ids, weights, jnp.ones((n,), bool), w1, w3, w2)
        else:  # chunk by chunk (padding rows are dropped), each recomputed in the backward pass
            c = -(-n // chunk)
            m = -(-n // c)

            def pad(a):  # [n, ...] -> [c, m, ...]
                return jnp.pad(a, ((0, c * m - n),) + ((0, 0),) * (a.ndim - 1)).reshape(c, m, *a.shape[1:])

            xs = (pad(xf), pad(ids), pad(weights), pad(jnp.ones((n,), bool)))
            out = jax.lax.map(jax.checkpoint(lambda a: dispatch(*a, w1, w3, w2)), xs).reshape(c * m, d)[:n]
        return out.astype(x.dtype).reshape(b, t, d), stats

    replay = () if expert_ids is None else (expert_ids,)
    fn = jax.shard_map(
        local,
        in_specs=(P(bspec, sspec, None), P(bspec, sspec), P(), P("expert", None, mlp), P("expert", None, mlp),
                  P("expert", mlp, None)) + ((P(bspec, sspec, None),) if replay else ()),
        out_specs=(P(bspec, sspec, None), RouterStats(P(), P(), P(), P(bspec, sspec, None))),
        check_vma=False,
    )
    y, stats = fn(x, mask, router, w1, w3, w2, *replay)
    ids = stats.expert_ids[:, :t_in]
    return y[:, :t_in], stats._replace(expert_ids=ids.reshape(-1, top_k))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, e, i = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.router = param(rngs, (d, e), ("embed", "experts_unsharded"), F32, std=std)  # fp32 (spec §7.1)
        self.w1 = param(rngs, (e, d, i), ("experts", "embed", "mlp"), pdt, std=std)  # gate
        self.w3 = param(rngs, (e, d, i), ("experts", "embed", "mlp"), pdt, std=std)  # up
        self.w2 = param(rngs, (e, i, d), ("experts", "mlp", "embed"), pdt, std=std)  # down

    def __call__(self, x, mask=None, expert_ids=None):
        """x: [batch, seq, hidden]; mask: optional [batch, seq]; expert_ids: optional [batch, seq,
        top_k], the experts to use (routing replay, see ``route``). Returns (y, RouterStats).

        Under a device mesh (jax.set_mesh) the experts run expert-parallel (moe_expert_parallel);
        otherwise all experts run here (dense grouped matmuls).
        """
        from m1jax.sharding import current_mesh

        cfg = self.cfg
        b, t, d = x.shape
        dt = x.dtype
        w1, w3, w2 = (w[...].astype(dt) for w in (self.w1, self.w3, self.w2))
        row_mask = jnp.ones((b, t), F32) if mask is None else mask.astype(F32)
        if current_mesh() is not None:
            return moe_expert_parallel(
                x, row_mask, self.router[...], w1, w3, w2, cfg.num_experts_per_tok, cfg.moe_capacity_factor,
                cfg.moe_chunk, expert_ids,
            )
        xf = x.reshape(b * t, d)
        logits = jnp.dot(xf.astype(F32), self.router[...], precision=HIGHEST)
        forced = None if expert_ids is None else expert_ids.reshape(b * t, -1)
        weights, ids, probs = route(logits, cfg.num_experts_per_tok, forced)
        if cfg.moe_impl == "auto":  # chosen when lowering, for the platform compiled for (AOT included)
            # (the flag is read here: platform_dependent traces its branches outside this call's context)
            on_cpu = functools.partial(cpu.expert_mlp_cpu, invariant=cpu.batch_invariant_now())
            y = jax.lax.platform_dependent(xf, ids, weights, w1, w3, w2, cpu=on_cpu, default=expert_mlp)
        else:
            y = (cpu.expert_mlp_dense if cfg.moe_impl == "dense" else expert_mlp)(xf, ids, weights, w1, w3, w2)
        stats = _router_stats(probs, ids, row_mask.reshape(-1), cfg.num_experts)
        return y.astype(dt).reshape(b, t, d), stats


def load_balancing_loss(stats: RouterStats, num_experts: int):
    """Switch aux loss over all layers: E * sum_e F_e * P_e, with F counting every top-k slot.

    stats: RouterStats with a leading layer axis ([L, E], [L, E], [L]).
    """
    rows = jnp.sum(stats.rows)
    f = jnp.sum(stats.count, axis=0) / rows
    p = jnp.sum(stats.prob_sum, axis=0) / rows
    return num_experts * jnp.sum(f * p)
