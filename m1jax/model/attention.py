"""Softmax GQA attention with partial rotary embeddings (spec §6)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax.model import cpu
from m1jax.model.config import ModelConfig
from m1jax.model.layers import F32, apply_rope, dtype_of, param
from m1jax.sharding import batch_spec, current_mesh, sequence_shards


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.q = param(rngs, (d, hd), ("embed", "heads_x_dim"), pdt, std=std)
        self.k = param(rngs, (d, kvd), ("embed", "kv_heads_x_dim"), pdt, std=std)
        self.v = param(rngs, (d, kvd), ("embed", "kv_heads_x_dim"), pdt, std=std)
        self.o = param(rngs, (hd, d), ("heads_x_dim", "embed"), pdt, std=std)

    def __call__(self, a, positions, mask=None, kv_cache=None, key_valid=None):
        """a: [batch, seq, hidden]; positions: [batch, seq] (RoPE); mask: optional [batch, seq] key mask.

        Without a cache: causal attention over the seq tokens (queries taken ``attention_chunk`` at a
        time). With ``kv_cache`` = (k, v), each [batch, kv_heads, max_len, head_dim], holding the
        earlier tokens in the columns that ``key_valid`` [batch, max_len] marks: the queries attend to
        those and, causally, to the new tokens. The cache is only read: the new tokens' keys and
        values are returned for the caller to write, so a decode step never copies a cache.

        Returns (out [batch, seq, hidden], (k, v) of the new tokens [batch, kv_heads, seq, head_dim]).
        Query head h uses kv head h // (heads / kv_heads). Scores and softmax in float32.
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
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, d]
        key_ok = jnp.ones((b, t), bool) if mask is None else mask > 0
        cache = None if kv_cache is None else (*kv_cache, key_valid > 0)
        attend = functools.partial(_attend, chunk=cfg.attention_chunk, sqrt_d=math.sqrt(d))
        mesh = current_mesh()
        if t > 1 and sequence_shards(mesh) > 1:
            o = _attend_sequence_parallel(attend, mesh, q, k, v, key_ok, cache)
        else:
            o = attend(q, jnp.arange(t), k, v, key_ok, cache)
        out = o.reshape(b, t, h * d) @ self.o[...].astype(dt)
        return out, (None if kv_cache is None else (k, v))


def _attend(q, rows, k, v, key_ok, cache, *, chunk: int, sqrt_d: float):
    """Causal softmax attention of queries q [B, R, KV, G, d] at rows (their indices among the
    T new tokens) over the new tokens' k, v [B, KV, T, d] (keys allowed by key_ok [B, T]) and, with
    ``cache`` = (k, v, valid), the cache's valid columns. Without a cache the queries are taken
    ``chunk`` at a time: a long sequence needs no [seq, seq] buffer. Returns [B, R, KV, G, d]."""
    b, r = q.shape[:2]
    t = k.shape[2]

    def rows_attend(q_rows, rows):
        causal = (jnp.arange(t)[None, :] <= rows[:, None])[None, None, None] & key_ok[:, None, None, None, :]
        if cache is not None and r > 1:  # prefill: only the cache's filled columns, in key blocks
            return _cached_attention(q_rows, *cache, (k, v, causal), sqrt_d, chunk)
        parts = [(k, v, causal)]
        if cache is not None:
            parts.insert(0, (cache[0], cache[1], cache[2][:, None, None, None, :]))
        return _softmax_attention(q_rows, parts, sqrt_d)

    if cache is not None or not chunk or r <= chunk:
        return rows_attend(q, rows)
    n = -(-r // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n * chunk - r), (0, 0), (0, 0), (0, 0)))
    qs = qp.reshape(b, n, chunk, *q.shape[2:]).swapaxes(0, 1)
    rows = jnp.pad(rows, (0, n * chunk - r), constant_values=t).reshape(n, chunk)  # past the end: padding rows
    o = jax.lax.map(jax.checkpoint(lambda xs: rows_attend(*xs)), (qs, rows)).swapaxes(0, 1)
    return o.reshape(b, n * chunk, *q.shape[2:])[:, :r]


def _shard_rows(r: int):
    """The global indices of a sequence shard's r contiguous query rows (inside the shard_map)."""
    return jax.lax.axis_index("sequence") * r + jnp.arange(r)


def _attend_sequence_parallel(attend, mesh, q, k, v, key_ok, cache):
    """``attend`` with the queries split over the mesh's sequence axis (context parallelism): each
    shard takes its contiguous rows and all the new tokens' keys and values (gathered by the
    partitioner: [B, KV, T, d] with 8 KV heads is small next to the queries' activations) and the
    whole cache. The causal mask uses the rows' global indices, so padding and left-padded prompts
    behave exactly as on one device. A length the axis does not divide gets padding rows at the
    end (dropped after). Every shard scores all T keys: the work is balanced across shards."""
    t, kv = q.shape[1], q.shape[2]
    n = sequence_shards(mesh)
    bspec = batch_spec(mesh)
    tp = mesh.shape["tensor"]
    hspec = "tensor" if tp > 1 and kv % tp == 0 else None
    pad = -t % n
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))

    def shard(q, k, v, key_ok, *cache):
        return attend(q, _shard_rows(q.shape[1]), k, v, key_ok, cache or None)

    q_spec, kv_spec = P(bspec, "sequence", hspec, None, None), P(bspec, hspec, None, None)
    cache_specs = () if cache is None else (kv_spec, kv_spec, P(bspec, None))
    fn = jax.shard_map(shard, in_specs=(q_spec, kv_spec, kv_spec, P(bspec, None)) + cache_specs, out_specs=q_spec,
                       check_vma=False)
    return fn(qp, k, v, key_ok, *(cache or ()))[:, :t]


def _dot(q, keys):
    """Scores of many queries q [B, T, KV, G, d] against keys [B, KV, S, d]: [B, KV, G, T, S] float32."""
    return jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(q.dtype), preferred_element_type=F32)


def _mix(w, values, dt):
    """Unnormalized softmax weights [B, KV, G, T, S] times values [B, KV, S, d], multiplied in the
    compute dtype ``dt`` and summed in float32: [B, T, KV, G, d] float32."""
    return jnp.einsum("bkgts,bksd->btkgd", w.astype(dt), values.astype(dt), preferred_element_type=F32)


def _softmax_attention(q, parts, sqrt_d):
    """softmax(q . keys / sqrt_d) . values over the keys of several (keys, values, allowed) parts.

    q: [B, T, KV, G, d]; keys/values: [B, KV, S, d]; allowed broadcasts to
    [B, KV, G, T, S]. A row with no allowed key gets uniform weights (as a -inf-free softmax does).
    """
    dt = q.dtype
    if q.shape[1] == 1:  # one query (decode): matrix-vector dots that stream the cache at DRAM speed
        # (not a multiply-reduce fusion over head_dim, which XLA:CPU runs at half the bandwidth)
        q1 = q[:, 0]  # [B, KV, G, d]: without the length-1 axis XLA picks cache-friendly layouts
        dot = lambda keys: cpu.decode_dot(q1, keys)[:, :, :, None]  # noqa: E731
        mix = lambda w, values: cpu.decode_mix(w[:, :, :, 0], values)[:, None]  # noqa: E731
    else:
        dot, mix = functools.partial(_dot, q), functools.partial(_mix, dt=dt)
    scores = [jnp.where(ok, dot(keys) / sqrt_d, jnp.finfo(F32).min) for keys, _, ok in parts]
    top = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]  # <= 1: safe in a bf16 product
    total = sum(w.sum(-1, keepdims=True) for w in weights)  # [B, KV, G, T, 1]
    # normalize the [T, d] output, not the [T, S] weights: one pass less over the largest array
    out = sum(mix(w, values) for w, (_, values, _) in zip(weights, parts))  # [B, T, KV, G, d] float32
    return (out / total.transpose(0, 3, 1, 2, 4)).astype(dt)


def _cached_attention(q, cache_k, cache_v, valid, new, sqrt_d, block: int):
    """softmax attention of q over the cache columns that ``valid`` [B, max_len] marks and the new
    tokens' part ``new`` = (keys, values, allowed), with an online softmax over key blocks of the
    cache that stops after the last valid column: a prefill chunk reads the columns filled so far,
    not all max_len (a dynamic trip count; inference only: fori_loop has no reverse-mode rule).

    Equal to ``_softmax_attention`` with the cache as one more part, up to summation order.
    """
    dt, (b, t, kv, g, d), max_len = q.dtype, q.shape, cache_k.shape[2]
    block = min(block or max_len, max_len)
    dot, mix = functools.partial(_dot, q), functools.partial(_mix, dt=dt)
    low = jnp.finfo(F32).min
    to_out = lambda x: x.transpose(0, 3, 1, 2, 4)  # noqa: E731 -- [B, KV, G, T, 1] -> [B, T, KV, G, 1]

    def add(carry, scores, values):  # fold one block of (masked) scores into (max, sum, output)
        m, l, acc = carry
        m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
        w, scale = jnp.exp(scores - m_new), jnp.exp(m - m_new)  # masked-only so far: wiped by a later scale of 0
        return m_new, l * scale + w.sum(-1, keepdims=True), acc * to_out(scale) + mix(w, values)

    def body(j, carry):
        start = jnp.minimum(j * block, max_len - block)  # the last block may overlap the one before:
        cols = start + jnp.arange(block)  # its columns before j * block are masked, so none counts twice
        ok = jax.lax.dynamic_slice_in_dim(valid, start, block, axis=1) & (cols >= j * block)
        keys, values = (jax.lax.dynamic_slice_in_dim(c, start, block, axis=2) for c in (cache_k, cache_v))
        return add(carry, jnp.where(ok[:, None, None, None], dot(keys) / sqrt_d, low), values)

    filled = jnp.max(jnp.where(valid, jnp.arange(max_len) + 1, 0))  # columns up to the last valid one
    init = (jnp.full((b, kv, g, t, 1), low, F32), jnp.zeros((b, kv, g, t, 1), F32), jnp.zeros((b, t, kv, g, d), F32))
    carry = jax.lax.fori_loop(0, (filled + block - 1) // block, body, init)
    keys, values, allowed = new
    m, l, acc = add(carry, jnp.where(allowed, dot(keys) / sqrt_d, low), values)
    return (acc / to_out(l)).astype(dt)
