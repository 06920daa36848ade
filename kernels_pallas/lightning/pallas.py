"""Pallas lightning-attention kernels: forward, and a two-sweep backward, for GPU and TPU.

Math per (batch, head, d_v tile), chunks of C tokens, state S [d_k, d_v] in float32
(see xla.py for the chunked form). Sequences are zero-padded to a multiple of C; inside a chunk
with ``valid`` real tokens, positions are clamped, p_j = min(j, valid - 1), which gives padded
tokens a decay of 1 and zero q/k/v, so they change neither outputs nor state:

    D[j, t]  = exp(-sigma (p_j - p_t)) for j >= t else 0
    gq_j     = exp(-sigma (p_j + 1))          gk_t = exp(-sigma (valid - 1 - p_t))
    O        = (Q K^T * D) V + gq * (Q S)
    S_next   = exp(-sigma valid) S + (gk * K)^T V

Backward, with dS the gradient flowing into the state that leaves a chunk:

    dQ = (dO V^T * D) K + gq * (dO S^T)                         forward sweep (recomputes S)
    dK = (dO V^T * D)^T Q + gk * (V dS^T)                         reverse sweep
    dV = (Q K^T * D)^T dO + gk * (K dS)
    dS <- exp(-sigma valid) dS + (gq * Q)^T dO                    (dS after chunk 0 = d initial_state)

No chunk state is stored between forward and backward. d_v may be split into tiles (a grid axis);
dQ and dK are then partial sums over tiles, added by the wrapper.

GPU (Triton lowering): grid (batch, heads, v_tiles); each program loops over the chunks of its
sequence with the state in registers; inputs stay in [batch, seq, heads, d] layout.
TPU (Mosaic): grid (batch, heads, v_tiles, chunks) with the chunk axis sequential ("arbitrary")
and the state in a VMEM scratch buffer; inputs are transposed to [batch, heads, seq, d].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- chunk math
def _decays(sigma, valid, c: int):
    """Decay factors of one chunk with `valid` real tokens: D [C, C], gq [C, 1], gk [C, 1], block scalar."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    last = valid - 1
    pr = jnp.minimum(rows, last).astype(F32)
    pc = jnp.minimum(cols, last).astype(F32)
    d = jnp.where(rows >= cols, jnp.exp(-sigma * jnp.maximum(pr - pc, 0.0)), 0.0)
    p = jnp.minimum(jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0), last).astype(F32)
    gq = jnp.exp(-sigma * (p + 1.0))
    gk = jnp.exp(-sigma * (last.astype(F32) - p))
    return d, gq, gk, jnp.exp(-sigma * valid.astype(F32))


def _prec(a):
    # fp32 operands: full fp32 products (no TF32 / bf16 passes); bf16: native MMA precision.
    return HIGHEST if a.dtype == F32 else None


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=F32, precision=_prec(a))


def _dot_t(a, b):  # a @ b^T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32, precision=_prec(a))


def _t_dot(a, b):  # a^T @ b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32, precision=_prec(a))


def _fwd_chunk(q, k, v, s, sigma, valid, c):
    d, gq, gk, blk = _decays(sigma, valid, c)
    scores = (_dot_t(q, k) * d).astype(v.dtype)
    o = _dot(scores, v) + gq * _dot(q, s.astype(q.dtype))
    s = blk * s + _t_dot((k.astype(F32) * gk).astype(k.dtype), v)
    return o, s


def _dq_chunk(k, v, do, s, sigma, valid, c):
    d, gq, gk, blk = _decays(sigma, valid, c)
    dov = (_dot_t(do, v) * d).astype(k.dtype)
    dq = _dot(dov, k) + gq * _dot_t(do, s.astype(do.dtype))
    s = blk * s + _t_dot((k.astype(F32) * gk).astype(k.dtype), v)
    return dq, s


def _dkv_chunk(q, k, v, do, ds, sigma, valid, c):
    d, gq, gk, blk = _decays(sigma, valid, c)
    dov = (_dot_t(do, v) * d).astype(q.dtype)
    qk = (_dot_t(q, k) * d).astype(do.dtype)
    dsx = ds.astype(q.dtype)
    dk = _t_dot(dov, q) + gk * _dot_t(v, dsx)
    dv = _t_dot(qk, do) + gk * _dot(k, dsx)
    ds = blk * ds + _t_dot((q.astype(F32) * gq).astype(q.dtype), do)
    return dk, dv, ds


def _valid(i, t: int, c: int):
    return jnp.minimum(t - i * c, c)


def _sigma(sig_ref):
    return jnp.max(sig_ref[...])  # the block holds sigma_h broadcast to [8, 128]


# ----------------------------------------------------------------------------- GPU kernels
def _gpu_fwd_kernel(sig_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, t, c, n):
    sigma = _sigma(sig_ref)

    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        o, s = _fwd_chunk(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], s, sigma, _valid(i, t, c), c)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return s

    st_ref[...] = jax.lax.fori_loop(0, n, body, s0_ref[...].astype(F32))


def _gpu_dq_kernel(sig_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, *, t, c, n):
    sigma = _sigma(sig_ref)

    def body(i, s):
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        dq, s = _dq_chunk(k_ref[sl, :], v_ref[sl, :], do_ref[sl, :], s, sigma, _valid(i, t, c), c)
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        return s

    jax.lax.fori_loop(0, n, body, s0_ref[...].astype(F32))


def _gpu_dkv_kernel(sig_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, *, t, c, n):
    sigma = _sigma(sig_ref)

    def body(j, ds):
        i = n - 1 - j
        sl = pl.ds(pl.multiple_of(i * c, c), c)
        dk, dv, ds = _dkv_chunk(
            q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :], ds, sigma, _valid(i, t, c), c
        )
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return ds

    ds0_ref[...] = jax.lax.fori_loop(0, n, body, dst_ref[...].astype(F32))


def _gpu_params(num_warps, num_stages):
    from jax.experimental.pallas import triton as pltr

    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- TPU kernels
def _tpu_fwd_kernel(sig_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, s_scr, *, t, c):
    i, n = pl.program_id(3), pl.num_programs(3)

    @pl.when(i == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(F32)

    o, s = _fwd_chunk(q_ref[...], k_ref[...], v_ref[...], s_scr[...], _sigma(sig_ref), _valid(i, t, c), c)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s

    @pl.when(i == n - 1)
    def _():
        st_ref[...] = s


def _tpu_dq_kernel(sig_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, s_scr, *, t, c):
    i = pl.program_id(3)

    @pl.when(i == 0)
    def _():
        s_scr[...] = s0_ref[...].astype(F32)

    dq, s = _dq_chunk(k_ref[...], v_ref[...], do_ref[...], s_scr[...], _sigma(sig_ref), _valid(i, t, c), c)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    s_scr[...] = s


def _tpu_dkv_kernel(sig_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, ds_scr, *, t, c):
    j, n = pl.program_id(3), pl.num_programs(3)
    i = n - 1 - j

    @pl.when(j == 0)
    def _():
        ds_scr[...] = dst_ref[...].astype(F32)

    dk, dv, ds = _dkv_chunk(
        q_ref[...], k_ref[...], v_ref[...], do_ref[...], ds_scr[...], _sigma(sig_ref), _valid(i, t, c), c
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_scr[...] = ds

    @pl.when(j == n - 1)
    def _():
        ds0_ref[...] = ds


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _vmem(shape):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, F32)


# ----------------------------------------------------------------------------- launchers
class KernelConfig:
    """Tiling: chunk length c, d_v tile bv; GPU warps/stages."""

    def __init__(self, backend: str, chunk: int, block_v: int, interpret: bool, num_warps=4, num_stages=2):
        self.backend, self.c, self.bv, self.interpret = backend, chunk, block_v, interpret
        self.num_warps, self.num_stages = num_warps, num_stages

    def __hash__(self):
        return hash(tuple(vars(self).items()))

    def __eq__(self, other):
        return isinstance(other, KernelConfig) and vars(self) == vars(other)


def _pad_seq(x, tp):
    t = x.shape[1]
    return x if t == tp else jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))


def _sig_table(sigma):
    return jnp.broadcast_to(jnp.asarray(sigma, F32)[:, None, None], (sigma.shape[0], 8, 128))


def forward(kc: KernelConfig, q, k, v, sigma, s0):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c, bv = kc.c, min(kc.bv, dv)
    n, nv = pl.cdiv(t, c), dv // bv
    tp = n * c
    q, k, v = (_pad_seq(x, tp) for x in (q, k, v))
    sig = _sig_table(sigma)
    out_shape = [jax.ShapeDtypeStruct((b, tp, h, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32)]
    if kc.backend == "gpu":
        o, st = pl.pallas_call(
            functools.partial(_gpu_fwd_kernel, t=t, c=c, n=n),
            grid=(b, h, nv),
            in_specs=[
                pl.BlockSpec((None, 8, 128), lambda i, j, m: (j, 0, 0)),
                pl.BlockSpec((None, tp, None, dk), lambda i, j, m: (i, 0, j, 0)),
                pl.BlockSpec((None, tp, None, dk), lambda i, j, m: (i, 0, j, 0)),
                pl.BlockSpec((None, tp, None, bv), lambda i, j, m: (i, 0, j, m)),
                pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m)),
            ],
            out_specs=[
                pl.BlockSpec((None, tp, None, bv), lambda i, j, m: (i, 0, j, m)),
                pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m)),
            ],
            out_shape=out_shape,
            compiler_params=None if kc.interpret else _gpu_params(kc.num_warps, kc.num_stages),
            interpret=kc.interpret,
            name="lightning_fwd",
        )(sig, q, k, v, s0)
        return o[:, :t], st
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    o, st = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, t=t, c=c),
        grid=(b, h, nv, n),
        in_specs=[
            pl.BlockSpec((None, 8, 128), lambda i, j, m, s: (j, 0, 0)),
            pl.BlockSpec((None, None, c, dk), lambda i, j, m, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, c, dk), lambda i, j, m, s: (i, j, s, 0)),
            pl.BlockSpec((None, None, c, bv), lambda i, j, m, s: (i, j, s, m)),
            pl.BlockSpec((None, None, dk, bv), lambda i, j, m, s: (i, j, 0, m)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, c, bv), lambda i, j, m, s: (i, j, s, m)),
            pl.BlockSpec((None, None, dk, bv), lambda i, j, m, s: (i, j, 0, m)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype), out_shape[1]],
        scratch_shapes=[_vmem((dk, bv))],
        compiler_params=None if kc.interpret else _tpu_params(),
        interpret=kc.interpret,
        name="lightning_fwd",
    )(sig, qt, kt, vt, s0)
    return o.transpose(0, 2, 1, 3)[:, :t], st


def backward(kc: KernelConfig, q, k, v, sigma, s0, do, dst):
    """Gradients (dq, dk, dv, ds0) of (out, final_state) w.r.t. (q, k, v, initial_state)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c, bv = kc.c, min(kc.bv, dv)
    n, nv = pl.cdiv(t, c), dv // bv
    tp = n * c
    q, k, v, do = (_pad_seq(x, tp) for x in (q, k, v, do))
    sig = _sig_table(sigma)
    dst = dst.astype(F32)
    if kc.backend == "gpu":
        params = None if kc.interpret else _gpu_params(kc.num_warps, kc.num_stages)
        qk_spec = pl.BlockSpec((None, tp, None, dk), lambda i, j, m: (i, 0, j, 0))
        v_spec = pl.BlockSpec((None, tp, None, bv), lambda i, j, m: (i, 0, j, m))
        s_spec = pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m))
        sig_spec = pl.BlockSpec((None, 8, 128), lambda i, j, m: (j, 0, 0))
        part_spec = pl.BlockSpec((None, None, tp, None, dk), lambda i, j, m: (m, i, 0, j, 0))
        dq = pl.pallas_call(
            functools.partial(_gpu_dq_kernel, t=t, c=c, n=n),
            grid=(b, h, nv),
            in_specs=[sig_spec, qk_spec, v_spec, v_spec, s_spec],
            out_specs=part_spec,
            out_shape=jax.ShapeDtypeStruct((nv, b, tp, h, dk), F32),
            compiler_params=params,
            interpret=kc.interpret,
            name="lightning_bwd_dq",
        )(sig, k, v, do, s0)
        dkp, dvv, ds0 = pl.pallas_call(
            functools.partial(_gpu_dkv_kernel, t=t, c=c, n=n),
            grid=(b, h, nv),
            in_specs=[sig_spec, qk_spec, qk_spec, v_spec, v_spec, s_spec],
            out_specs=[part_spec, v_spec, s_spec],
            out_shape=[
                jax.ShapeDtypeStruct((nv, b, tp, h, dk), F32),
                jax.ShapeDtypeStruct((b, tp, h, dv), v.dtype),
                jax.ShapeDtypeStruct((b, h, dk, dv), F32),
            ],
            compiler_params=params,
            interpret=kc.interpret,
            name="lightning_bwd_dkv",
        )(sig, q, k, v, do, dst)
        dq, dkk = dq.sum(0)[:, :t], dkp.sum(0)[:, :t]
        return dq.astype(q.dtype), dkk.astype(k.dtype), dvv[:, :t], ds0
    params = None if kc.interpret else _tpu_params()
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    sig_spec = pl.BlockSpec((None, 8, 128), lambda i, j, m, s: (j, 0, 0))
    s_spec = pl.BlockSpec((None, None, dk, bv), lambda i, j, m, s: (i, j, 0, m))
    fwd_qk = pl.BlockSpec((None, None, c, dk), lambda i, j, m, s: (i, j, s, 0))
    fwd_v = pl.BlockSpec((None, None, c, bv), lambda i, j, m, s: (i, j, s, m))
    fwd_part = pl.BlockSpec((None, None, None, c, dk), lambda i, j, m, s: (m, i, j, s, 0))
    rev = lambda s: n - 1 - s  # noqa: E731
    rev_qk = pl.BlockSpec((None, None, c, dk), lambda i, j, m, s: (i, j, rev(s), 0))
    rev_v = pl.BlockSpec((None, None, c, bv), lambda i, j, m, s: (i, j, rev(s), m))
    rev_part = pl.BlockSpec((None, None, None, c, dk), lambda i, j, m, s: (m, i, j, rev(s), 0))
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, t=t, c=c),
        grid=(b, h, nv, n),
        in_specs=[sig_spec, fwd_qk, fwd_v, fwd_v, s_spec],
        out_specs=fwd_part,
        out_shape=jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
        scratch_shapes=[_vmem((dk, bv))],
        compiler_params=params,
        interpret=kc.interpret,
        name="lightning_bwd_dq",
    )(sig, kt, vt, dot_, s0)
    dkp, dvv, ds0 = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, t=t, c=c),
        grid=(b, h, nv, n),
        in_specs=[sig_spec, rev_qk, rev_qk, rev_v, rev_v, s_spec],
        out_specs=[rev_part, rev_v, s_spec],
        out_shape=[
            jax.ShapeDtypeStruct((nv, b, h, tp, dk), F32),
            jax.ShapeDtypeStruct((b, h, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), F32),
        ],
        scratch_shapes=[_vmem((dk, bv))],
        compiler_params=params,
        interpret=kc.interpret,
        name="lightning_bwd_dkv",
    )(sig, qt, kt, vt, dot_, dst)
    back = lambda x: x.transpose(0, 2, 1, 3)[:, :t]  # noqa: E731
    return back(dq.sum(0)).astype(q.dtype), back(dkp.sum(0)).astype(k.dtype), back(dvv), ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def lightning_attention_pallas(kc: KernelConfig, q, k, v, sigma, s0):
    return forward(kc, q, k, v, sigma, s0)


def _vjp_fwd(kc, q, k, v, sigma, s0):
    return forward(kc, q, k, v, sigma, s0), (q, k, v, sigma, s0)


def _vjp_bwd(kc, res, g):
    q, k, v, sigma, s0 = res
    do, dst = g
    dq, dk, dv, ds0 = backward(kc, q, k, v, sigma, s0, do, dst)
    # The decay rates are fixed functions of the architecture (not trained): no gradient.
    return dq, dk, dv, jnp.zeros_like(sigma), ds0.astype(s0.dtype)


lightning_attention_pallas.defvjp(_vjp_fwd, _vjp_bwd)


# ----------------------------------------------------------------------------- decode
def _decode_kernel(sig_ref, q_ref, k_ref, v_ref, s_ref, o_ref, snew_ref):
    """One token: S <- lam S + k^T v ; o = q S. q, k: [d_k, 1] columns, v: [1, d_v] row."""
    lam = jnp.exp(-_sigma(sig_ref))
    s = lam * s_ref[...].astype(F32) + k_ref[...].astype(F32) * v_ref[...].astype(F32)
    o_ref[...] = jnp.sum(q_ref[...].astype(F32) * s, axis=0, keepdims=True).astype(o_ref.dtype)
    snew_ref[...] = s


def decode(kc: KernelConfig, q, k, v, sigma, state):
    """q, k: [batch, heads, d_k]; v: [batch, heads, d_v]; state [batch, heads, d_k, d_v] float32.

    The new state is written in place of the old one (input/output aliasing) when the caller donates it.
    """
    b, h, dk = q.shape
    dv = v.shape[-1]
    col = pl.BlockSpec((None, None, dk, 1), lambda i, j: (i, j, 0, 0))
    row = pl.BlockSpec((None, None, 1, dv), lambda i, j: (i, j, 0, 0))
    st = pl.BlockSpec((None, None, dk, dv), lambda i, j: (i, j, 0, 0))
    params = None
    if not kc.interpret:
        params = _gpu_params(kc.num_warps, 1) if kc.backend == "gpu" else None
    o, s = pl.pallas_call(
        _decode_kernel,
        grid=(b, h),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i, j: (j, 0, 0)), col, col, row, st],
        out_specs=[row, st],
        out_shape=[jax.ShapeDtypeStruct((b, h, 1, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), F32)],
        input_output_aliases={4: 1},
        compiler_params=params,
        interpret=kc.interpret,
        name="lightning_decode",
    )(_sig_table(sigma), q[..., None], k[..., None], v[:, :, None, :], state.astype(F32))
    return o[:, :, 0], s
