"""Lightning attention mixer (spec §5): SiLU(qkv) head-major, decayed linear attention, RMSNorm
over all heads, sigmoid output gate from the layer input. Computed in float32 from SiLU onward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas import combine_sequence_shards, lightning_attention, lightning_decode
from m1jax.model.config import ModelConfig
from m1jax.model.layers import F32, dtype_of, param, rms_norm
from m1jax.sharding import batch_spec, current_mesh, sequence_shards


def _lightning_op(q, k, v, decay_rate, state, cfg: ModelConfig):
    """The lightning operator: a chunked pass over q, k, v [batch, seq, heads, d] or, for
    [batch, heads, d] inputs with a state, one decode step. Under a mesh it runs in a shard_map
    over batch and heads (the kernels are per-device programs that the automatic partitioner
    cannot split) and, for a chunked pass on a mesh with a sequence axis, over the sequence: each
    shard runs the kernel on its tokens from a zero state and ``combine_sequence_shards`` adds the
    earlier shards' decayed states. A length the axis does not divide is padded in front with
    zero tokens (they change no state)."""
    decode = q.ndim == 3
    kw = dict(impl=cfg.lightning_impl, pallas_backend=cfg.pallas_backend)
    if decode:
        op = functools.partial(lightning_decode, **kw)
    else:
        op = functools.partial(lightning_attention, block_size=cfg.block_size, **kw)
    mesh = current_mesh()
    if mesh is None:
        return op(q, k, v, decay_rate, state)
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    bspec = batch_spec(mesh)
    hspec = "tensor" if h % mesh.shape["tensor"] == 0 and mesh.shape["tensor"] > 1 else None
    s_spec = P(bspec, hspec, None, None)
    n = sequence_shards(mesh)
    if decode or n == 1:
        if state is None:
            state = jnp.zeros((b, h, d, v.shape[-1]), F32)
        x_spec = P(bspec, hspec, None) if decode else P(bspec, None, hspec, None)
        fn = jax.shard_map(op, in_specs=(x_spec, x_spec, x_spec, P(hspec), s_spec), out_specs=(x_spec, s_spec),
                           check_vma=False)
        return fn(q, k, v, decay_rate, state)

    t = q.shape[1]
    pad = -t % n
    q, k, v = (jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0))) for x in (q, k, v))

    def shard(q, k, v, decay_rate, *state):
        out, local = op(q, k, v, decay_rate, None)
        return combine_sequence_shards(q, out, local, decay_rate, state[0] if state else None,
                                       axis_name="sequence", pad=pad)

    x_spec = P(bspec, "sequence", hspec, None)
    args = (q, k, v, decay_rate) + (() if state is None else (state,))
    fn = jax.shard_map(shard, in_specs=(x_spec, x_spec, x_spec, P(hspec)) + (s_spec,) * (state is not None),
                       out_specs=(x_spec, s_spec), check_vma=False)
    out, state = fn(*args)
    return out[:, pad:], state


class LightningAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        # qkv output channels are head-major: [head][q|k|v][head_dim] (spec §5.1).
        self.qkv = param(rngs, (d, 3 * hd), ("embed", "qkv"), pdt, std=std)
        self.gate = param(rngs, (d, hd), ("embed", "heads_x_dim"), pdt, std=std)
        self.out = param(rngs, (hd, d), ("heads_x_dim", "embed"), pdt, std=std)
        self.norm = param(None, (hd,), ("heads_x_dim",), pdt, ones=True)

    def __call__(self, a, decay_rate, mask=None, state=None):
        """a: [batch, seq, hidden] (normed layer input); decay_rate: sigma [heads] float32;
        mask: optional [batch, seq] (1 = token, 0 = padding); state: optional [batch, heads, d, d].

        Returns (out [batch, seq, hidden], final state [batch, heads, d, d] float32).
        """
        cfg = self.cfg
        b, t, _ = a.shape
        h, d = cfg.num_heads, cfg.head_dim
        dt = a.dtype
        u = jax.nn.silu((a @ self.qkv[...].astype(dt)).astype(F32))  # [B, T, 3*H*d]
        if mask is not None:  # padded tokens contribute nothing to the state
            u = u * mask[:, :, None].astype(F32)
        u = u.reshape(b, t, h, 3 * d)
        q, k, v = u[..., :d], u[..., d : 2 * d], u[..., 2 * d :]
        if t == 1 and state is not None:  # one decode step: the recurrence
            o, state = _lightning_op(q[:, 0], k[:, 0], v[:, 0], decay_rate, state, cfg)
            o = o[:, None]
        else:
            o, state = _lightning_op(q, k, v, decay_rate, state, cfg)
        y = rms_norm(o.reshape(b, t, h * d), self.norm[...].astype(F32), cfg.lightning_norm_eps)
        y = jax.nn.sigmoid((a @ self.gate[...].astype(dt)).astype(F32)) * y
        return y.astype(dt) @ self.out[...].astype(dt), state
