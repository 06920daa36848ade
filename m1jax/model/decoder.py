"""The MiniMax-M1 decoder: layers grouped by the repeating layer pattern and scanned.

Layer l computes (spec §4.2, postnorm=True)::

    a  = RMSNorm(x);   x1 = alpha_attn * a + beta_attn * Mixer_l(a)
    b  = RMSNorm(x1);  x2 = alpha_mlp  * b + beta_mlp  * MoE(b)

(postnorm=False uses x and x1 as the residuals instead of a and b, spec §4.3).

Parameters of the ``period`` layers of one repeat of the pattern live in a ``Block``; ``repeats``
copies of it are stacked on a leading axis and run with ``lax.scan``, so an 80-layer model traces
and compiles one 8-layer block. Layers that do not fill a whole repeat form an unscanned-size tail
block (stacked with a leading axis of 1, same code path).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.model.attention import Attention
from m1jax.model.config import LINEAR, ModelConfig
from m1jax.model.layers import F32, HIGHEST, RMSNorm, dtype_of, param
from m1jax.model.lightning import LightningAttention
from m1jax.model.moe import MoE, RouterStats, load_balancing_loss
from m1jax.sharding import constrain


class ModelOutput(NamedTuple):
    logits: jax.Array  # [batch, seq, vocab] float32 when lm_head_fp32
    aux_loss: jax.Array  # [] Switch load-balancing loss (unscaled; times router_aux_loss_coef in the loss)
    router_stats: RouterStats  # per layer, leading axis [num_layers]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_type = layer_type
        pdt = dtype_of(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        if layer_type == LINEAR:
            self.mixer = LightningAttention(cfg, rngs=rngs)
            self.alpha, self.beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            self.mixer = Attention(cfg, rngs=rngs)
            self.alpha, self.beta = cfg.full_attn_alpha, cfg.full_attn_beta
        self.moe = MoE(cfg, rngs=rngs)

    def __call__(self, x, decay_rate, positions, mask, cache=None, key_valid=None, expert_ids=None):
        """cache: this layer's entry of the hybrid cache (lightning: {"state"}; softmax: {"k", "v"})
        or None; expert_ids: this layer's [batch, seq, top_k] routing to replay, or None. Returns
        (x, RouterStats, new entry or None): the new state of a lightning layer, the new tokens'
        columns {"k", "v"} of a softmax layer (written into the cache by the model)."""
        a = self.input_norm(x)
        if self.layer_type == LINEAR:
            m, state = self.mixer(a, decay_rate, mask, None if cache is None else cache["state"])
            new_cache = None if cache is None else {"state": state}
        else:
            kv = None if cache is None else (cache["k"], cache["v"])
            m, kv = self.mixer(a, positions, mask, kv, key_valid)
            new_cache = None if cache is None else {"k": kv[0], "v": kv[1]}
        x1 = self.alpha * (a if self.cfg.postnorm else x) + self.beta * m
        b = self.post_norm(x1)
        y, stats = self.moe(b, mask, expert_ids)
        x2 = self.cfg.mlp_alpha * (b if self.cfg.postnorm else x1) + self.cfg.mlp_beta * y
        return constrain(x2.astype(x.dtype), "batch", "seq", "act_embed"), stats, new_cache


class Block(nnx.Module):
    """One repeat of the layer pattern: len(layer_types) consecutive layers."""

    def __init__(self, cfg: ModelConfig, layer_types: tuple[str, ...], *, rngs: nnx.Rngs):
        self.layer_types = layer_types
        self.remat_layers = cfg.remat_layers
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in layer_types])

    def __call__(self, x, decay_rates, positions, mask, cache=None, key_valid=None, expert_ids=None):
        """decay_rates: [len(layer_types), heads]; cache: list of per-layer entries or None;
        expert_ids: [len(layer_types), batch, seq, top_k] routing to replay, or None.

        Returns (x, RouterStats stacked over the layers, new cache list or None)."""
        all_stats, new_cache = [], []
        for i, layer in enumerate(self.layers):
            entry = None if cache is None else cache[i]
            ids = None if expert_ids is None else expert_ids[i]
            if self.remat_layers and cache is None:  # the backward recomputes this layer on its own
                x, stats, entry = nnx.remat(DecoderLayer.__call__)(layer, x, decay_rates[i], positions, mask,
                                                                   None, None, ids)
            else:
                x, stats, entry = layer(x, decay_rates[i], positions, mask, entry, key_valid, ids)
            all_stats.append(stats)
            new_cache.append(entry)
        return x, jax.tree.map(lambda *s: jnp.stack(s), *all_stats), (None if cache is None else new_cache)


def _stacked_blocks(cfg: ModelConfig, layer_types, repeats: int, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, layer_types, rngs=r)

    return make(rngs)


def _run_stacked(blocks: Block, x, decay_rates, positions, mask, remat: bool, cache=None, key_valid=None,
                 expert_ids=None):
    """Scan x through stacked blocks. decay_rates: [repeats, period, heads]; cache: per-slot list
    of entries with a leading [repeats] axis (scanned along with the parameters), or None;
    expert_ids: [repeats, period, batch, seq, top_k] routing to replay, or None.
    Returns (x, stats, new entries stacked over the repeats or None)."""

    # A plain lax.scan over the split parameter state (each step merges one block's slice):
    # unlike nnx.scan it nests under any enclosing trace (jit, while_loop, shard_map).
    graphdef, params = nnx.split(blocks)

    def body(x, xs):
        block_params, rates, cache, ids = xs
        x, stats, cache = nnx.merge(graphdef, block_params)(x, rates, positions, mask, cache, key_valid, ids)
        return x, (stats, cache)

    if remat:
        body = jax.checkpoint(body)
    x, (stats, cache) = jax.lax.scan(body, x, (params, decay_rates, cache, expert_ids))
    return x, jax.tree.map(lambda s: s.reshape((-1,) + s.shape[2:]), stats), cache  # stats: [repeats*period, ...]


class MiniMaxM1(nnx.Module):
    """Hybrid lightning/softmax-attention MoE decoder with an untied (float32) LM head.

    ``model(input_ids)`` -> logits [batch, seq, vocab]; ``model.forward(...)`` also returns the
    load-balancing loss and per-layer router statistics.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt, std=std)
        period, repeats, tail = cfg.pattern
        self.blocks = _stacked_blocks(cfg, period, repeats, rngs)
        self.tail = _stacked_blocks(cfg, tail, 1, rngs) if tail else None
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt, std=std)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        return self.forward(input_ids, attention_mask, positions).logits

    def hidden_states(self, input_ids, attention_mask=None, positions=None, cache=None, cache_index=None,
                      expert_ids=None):
        """Final-normed hidden states [batch, seq, hidden], per-layer RouterStats and the new cache.
        expert_ids: optional [num_layers, batch, seq, top_k], the experts each token uses in each
        layer (routing replay: e.g. the sampler's recorded routing), instead of the router's top-k.

        cache: from ``init_cache`` (hybrid: lightning states and softmax KV caches) or None.
        With a cache, ``input_ids`` are written at column ``cache_index`` of the KV caches: one
        column for all rows (an int), or for a single new token per row, a column per row (an int32
        array [batch]: the slot engine, whose rows are at different steps).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        dt = dtype_of(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(self.embed[...][input_ids].astype(dt), "batch", "seq", "act_embed")
        rates = jnp.asarray(cfg.decay_rates(), F32)  # [L, H]
        period, repeats, tail = cfg.pattern
        n = repeats * len(period)
        key_valid = None if cache is None else cache["key_valid"]  # the earlier tokens' columns
        ids = expert_ids  # any integer dtype: the router casts (moe.route)
        x, stats, blocks_new = _run_stacked(
            self.blocks, x, rates[:n].reshape(repeats, len(period), -1), positions, attention_mask, cfg.remat,
            None if cache is None else cache["blocks"], key_valid,
            None if ids is None else ids[:n].reshape(repeats, len(period), *ids.shape[1:]),
        )
        tail_new = None
        if self.tail is not None:
            x, tail_stats, tail_new = _run_stacked(
                self.tail, x, rates[n:][None], positions, attention_mask, cfg.remat,
                None if cache is None else cache["tail"], key_valid, None if ids is None else ids[n:][None],
            )
            stats = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), stats, tail_stats)
        new_cache = None
        if cache is not None:
            new_valid = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            new_cache = {
                "blocks": _write_columns(cache["blocks"], blocks_new, cache_index),
                "tail": None if self.tail is None else _write_columns(cache["tail"], tail_new, cache_index),
                "key_valid": _write_valid(key_valid, new_valid, cache_index),
            }
        return self.final_norm(x), stats, new_cache

    def init_cache(self, batch: int, max_len: int, kv_dtype=None):
        """Empty hybrid cache: per lightning layer a float32 state [batch, heads, d, d]; per softmax
        layer k, v [batch, kv_heads, max_len, head_dim]; key_valid [batch, max_len]."""
        cfg = self.cfg
        kv_dtype = kv_dtype or dtype_of(cfg.dtype)
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads

        def entries(types, reps):
            out = []
            for ty in types:
                if ty == LINEAR:
                    out.append({"state": jnp.zeros((reps, batch, h, d, d), F32)})
                else:
                    z = jnp.zeros((reps, batch, kv, max_len, d), kv_dtype)
                    out.append({"k": z, "v": z})
            return out

        period, repeats, tail = cfg.pattern
        return {
            "blocks": entries(period, repeats),
            "tail": entries(tail, 1) if tail else None,
            "key_valid": jnp.zeros((batch, max_len), jnp.int32),
        }

    def forward_with_cache(self, input_ids, cache, cache_index, attention_mask=None, positions=None,
                           return_routing: bool = False):
        """Prefill (seq > 1) or decode (seq = 1) against a hybrid cache. Returns (logits, cache), plus
        the routing [num_layers, batch * seq, top_k] expert ids when return_routing."""
        h, stats, cache = self.hidden_states(input_ids, attention_mask, positions, cache, cache_index)
        if return_routing:
            return self.logits(h), cache, stats.expert_ids
        return self.logits(h), cache

    def logits(self, h):
        """LM head; float32 when cfg.lm_head_fp32 (the paper's fix for train/inference mismatch)."""
        w = self.lm_head[...]
        if self.cfg.lm_head_fp32:
            return jnp.dot(h.astype(F32), w.astype(F32), precision=HIGHEST)
        return (h @ w.astype(h.dtype)).astype(F32)

    def forward(self, input_ids, attention_mask=None, positions=None, expert_ids=None) -> ModelOutput:
        """input_ids [batch, seq] int; attention_mask optional [batch, seq] (1 = token);
        positions optional [batch, seq] (default arange, as transformers); expert_ids optional
        [num_layers, batch, seq, top_k] (routing replay, see ``hidden_states``)."""
        h, stats, _ = self.hidden_states(input_ids, attention_mask, positions, expert_ids=expert_ids)
        return ModelOutput(self.logits(h), load_balancing_loss(stats, self.cfg.num_experts), stats)


def _write_columns(cache, new, cache_index):
    """The cache after a step: lightning entries replaced by their new states, softmax entries with
    the new tokens' k/v [repeats, batch, kv_heads, seq, head_dim] written at column cache_index (an
    in-place update when the cache is a loop carry); a cache_index per row [batch] writes one
    token's column in each row."""

    def write(old, cols):
        if jnp.ndim(cache_index):
            rows = jnp.arange(old.shape[1])  # advanced indices around a slice: [batch, repeats, kv, d]
            return old.at[:, rows, :, cache_index].set(cols[:, :, :, 0].swapaxes(0, 1).astype(old.dtype))
        return jax.lax.dynamic_update_slice(old, cols.astype(old.dtype), (0, 0, 0, cache_index, 0))

    return [jax.tree.map(write, old, e) if "k" in old else e for old, e in zip(cache, new)]


def _write_valid(key_valid, new_valid, cache_index):
    """key_valid [batch, max_len] with the new tokens' mask [batch, seq] written at cache_index."""
    if jnp.ndim(cache_index):
        return key_valid.at[jnp.arange(key_valid.shape[0]), cache_index].set(new_valid[:, 0])
    return jax.lax.dynamic_update_slice(key_valid, new_valid, (0, cache_index))


def layer_index(cfg: ModelConfig, l: int) -> tuple[str, int, int]:
    """Where global layer l lives: ("blocks" | "tail", stack index, slot within the block)."""
    period, repeats, _ = cfg.pattern
    p = len(period)
    if l < repeats * p:
        return "blocks", l // p, l % p
    return "tail", 0, l - repeats * p
