"""Generation with a hybrid cache: one prefill, then one jitted ``lax.while_loop`` of decode steps.

Prompts are left-padded, so every sequence writes its next token at the same cache column; RoPE
positions count real tokens only. Lightning layers keep a constant-size float32 state per
sequence; softmax layers keep a KV cache of prompt + max_new_tokens columns. Group sampling
prefills each prompt once and forks its cache to ``num_samples`` sequences.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.model import MiniMaxM1
from m1jax.rollout.sampling import SamplingParams, sample
from m1jax.sharding import batch_shards, current_mesh

RUNNING, STOP, LENGTH, REPETITION, ERROR = 0, 1, 2, 3, 4
FINISH_REASONS = {RUNNING: "running", STOP: "stop", LENGTH: "length", REPETITION: "repetition", ERROR: "error"}


class Rollout(NamedTuple):
    tokens: jax.Array  # [N, max_new_tokens] int32; entries past `lengths` are 0
    logprobs: jax.Array  # [N, max_new_tokens] full-vocabulary log pi_T (see sampling.py)
    logprobs_truncated: jax.Array  # [N, max_new_tokens] under the truncated distribution
    lengths: jax.Array  # [N] generated tokens (the stop token included)
    finish_reason: jax.Array  # [N] int32, keys of FINISH_REASONS
    # With record_routing: top-k expert ids per token and layer, for routing replay in training.
    routing: jax.Array | None = None  # [N, max_new_tokens, num_layers, top_k]
    prompt_routing: jax.Array | None = None  # [B, prompt_width, num_layers, top_k] (left-padded)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None, rows: int | None = None):
    """Token lists -> (ids [R, W] int32, mask [R, W] int32), left-padded. W = ``width`` (default: the
    longest prompt), R = ``rows`` (default: one per prompt; the rows past the prompts repeat the first
    one), so that batches of a fixed shape reuse one compiled program."""
    longest = max(len(p) for p in prompts)
    width = longest if width is None else width
    rows = len(prompts) if rows is None else rows
    if width < longest or rows < len(prompts):
        raise ValueError(f"left_pad: {len(prompts)} prompts of up to {longest} tokens do not fit [{rows}, {width}].")
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]
        if len(p):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    return ids, mask


def _fork(cache, g: int):
    """Repeat every sequence's cache g times (samples of one prompt are adjacent)."""

    def rep(path, x):
        batch_axis = 0 if path[-1].key == "key_valid" else 1  # layer entries carry [repeats, batch, ...]
        return jnp.repeat(x, g, axis=batch_axis)

    return jax.tree_util.tree_map_with_path(rep, cache)


def _prefill(graphdef, state, ids, mask, cache, chunk: int):
    """Prefill the cache in chunks of ``chunk`` columns (a lax.scan), so that softmax attention
    scores are [chunk, max_len] rather than [prompt, max_len].

    Returns (last logits [B, V], cache, routing [B, P, num_layers, top_k])."""
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    n = p // chunk
    split = lambda x: x.reshape(b, n, chunk).swapaxes(0, 1)  # noqa: E731

    def body(cache, xs):
        i, ids_c, mask_c, pos_c = xs
        logits, cache, routing = nnx.merge(graphdef, state).forward_with_cache(
            ids_c, cache, i * chunk, mask_c, pos_c, return_routing=True)
        return cache, (logits[:, -1], routing)

    cache, (last, routing) = jax.lax.scan(body, cache, (jnp.arange(n), split(ids), split(mask), split(positions)))
    layers, k = routing.shape[1], routing.shape[-1]
    routing = routing.reshape(n, layers, b, chunk, k).transpose(2, 0, 3, 1, 4).reshape(b, p, layers, k)
    return last[-1], cache, routing


def _loop_layout(cache, repeats: int, into_loop: bool):
    """The cache as the decode loop carries it (into_loop) or as the model takes it (not into_loop):
    stacks with a single repeat (the tail block; all blocks when the pattern repeats once) drop
    their leading axis. A state carried as [1, ...] but updated as [...] cannot be updated in
    place, and XLA copied it every step."""
    out = dict(cache)
    for name in ("blocks", "tail"):
        if cache[name] is not None and (name == "tail" or repeats == 1):
            out[name] = jax.tree.map(lambda x: x[0] if into_loop else x[None], cache[name])
    return out


def _compiler_options(cfg) -> dict:
    """XLA:CPU options for the prefill and decode programs (other backends get none):

    * Its default copy insertion copies every loop-carried buffer that is both read and updated in
      place (here: each KV cache, every decode step — the whole cache). Its region analysis proves
      the reads happen first and drops the copies.
    * Its float normalization computes a bf16 update-slice in float32: writing one column of a bf16
      KV cache converted (so rewrote) the whole cache every step. Without the pass the column is
      written in place. Only for float32 compute, whose only bf16 arithmetic is then the decode
      attention's dots with a bf16 cache (which XLA:CPU's YNNPACK runs natively); a bf16-compute
      model needs the pass (XLA:CPU's own dot emitter has no bf16).
    """
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_cpu_copy_insertion_use_region_analysis": True}
    if jnp.dtype(cfg.dtype) == jnp.float32:
        options["xla_disable_hlo_passes"] = "float-normalization-bf16"
    return options


class _Static:
    """A static jit argument hashed once. jit hashes its static arguments on every call, and an nnx
    GraphDef (or a State's treedef) hashes by walking the whole model: about a millisecond, paid
    by each of the hundreds of prefills, inserts and decode segments of one sampling call."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Static) and self._hash == other._hash and self.value == other.value)

    @classmethod
    def of(cls, value) -> "_Static":
        """The one _Static of values equal to ``value``: jit compares a call's static arguments with
        those of its cached programs, and the same object compares without walking the model."""
        new = cls(value)
        return _interned.setdefault(new, new)


_interned: dict = {}  # _Static -> itself: one object per distinct model structure
_split = {}  # id(state) -> (graphdef, _Static(graphdef), _Static(treedef), leaves) while the state lives


def _flat_split(graphdef, state):
    """(graphdef, treedef, leaves) of a split model, computed once per State object: a sampling call
    passes the same (graphdef, state) to every program it runs. The entry goes with the state."""
    entry = _split.get(id(state))
    if entry is None or entry[0] is not graphdef:
        leaves, treedef = jax.tree_util.tree_flatten(state)
        entry = (graphdef, _Static.of(graphdef), _Static.of(treedef), leaves)
        if id(state) not in _split:
            weakref.finalize(state, _split.pop, id(state), None)
        _split[id(state)] = entry
    return entry[1:]


def _jit(**jit_kw):
    """jax.jit of fn(graphdef, state, ...), compiled with ``_compiler_options`` for its model. The
    compiled function takes the state as its flat leaves and the graphdef and treedef hashed once
    (``_flat_split``): what jit checks on each call is then the leaves, not the model's structure."""

    def wrap(fn):
        def flat(graphdef, treedef, leaves, *args, **kwargs):
            return fn(graphdef.value, jax.tree_util.tree_unflatten(treedef.value, leaves), *args, **kwargs)

        params = list(inspect.signature(fn).parameters.values())  # (graphdef, state, ...)
        flat.__signature__ = inspect.Signature(
            [params[0], inspect.Parameter("treedef", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             inspect.Parameter("leaves", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params[2:]])
        kw = {**jit_kw, "static_argnames": (*jit_kw.get("static_argnames", ()), "treedef")}

        @functools.cache
        def jitted(options):
            return jax.jit(flat, compiler_options=dict(options), **kw)

        options = {}  # graphdef -> its model's options (static: merging the model once is enough)

        def for_model(graphdef, state):
            g, treedef, leaves = _flat_split(graphdef, state)
            if g not in options:
                options[g] = tuple(sorted(_compiler_options(nnx.merge(graphdef, state).cfg).items()))
            return jitted(options[g]), (g, treedef, leaves)

        @functools.wraps(fn)
        def call(graphdef, state, *args, **kwargs):
            f, split = for_model(graphdef, state)
            return f(*split, *args, **kwargs)

        def lower(graphdef, state, *args, **kwargs):
            f, split = for_model(graphdef, state)
            return f.lower(*split, *args, **kwargs)

        call.lower = lower
        return call

    return wrap


@_jit(static_argnames=("graphdef", "max_new", "chunk", "kv_dtype"))
def prefill(graphdef, state, ids, mask, max_new: int, chunk: int, kv_dtype: str | None = None):
    """Fill a fresh hybrid cache of prompt + max_new columns (KV caches in ``kv_dtype``, default the
    model's compute dtype). Returns (last logits, cache, n_real, routing)."""
    b, p = ids.shape
    cache = nnx.merge(graphdef, state).init_cache(b, p + max_new, kv_dtype and jnp.dtype(kv_dtype))
    # A fresh cache is a compile-time constant; without the barrier XLA constant-folds the attention
    # scores of the first chunk against it (tens of seconds of compile time for a long prompt).
    cache = jax.lax.optimization_barrier(cache)
    last, cache, routing = _prefill(graphdef, state, ids, mask, cache, chunk)
    return last, cache, mask.sum(axis=1).astype(jnp.int32), routing


@_jit(static_argnames=("graphdef", "params", "num_samples", "record_routing"))
def decode(graphdef, state, cache, last, n_real, prompt_width, key, params: SamplingParams,
           num_samples: int, record_routing: bool = False) -> Rollout:
    """The decode loop (one lax.while_loop) from a prefilled cache; forks it to num_samples first."""
    p = prompt_width
    max_new = params.max_new_tokens
    if num_samples > 1:
        cache, last, n_real = _fork(cache, num_samples), jnp.repeat(last, num_samples, 0), jnp.repeat(n_real, num_samples)
    n = last.shape[0]
    cfg = nnx.merge(graphdef, state).cfg
    carried = functools.partial(_loop_layout, repeats=cfg.pattern[1], into_loop=True)
    as_model_takes = functools.partial(_loop_layout, repeats=cfg.pattern[1], into_loop=False)
    stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    f32 = jnp.zeros((n, max_new), jnp.float32)
    init = dict(
        step=jnp.int32(0), cache=carried(cache), last=last, key=key, done=jnp.zeros((n,), bool),
        reason=jnp.zeros((n,), jnp.int32), run=jnp.zeros((n,), jnp.int32), lengths=jnp.zeros((n,), jnp.int32),
        tokens=jnp.zeros((n, max_new), jnp.int32), logprobs=f32, logprobs_truncated=f32,
    )
    if record_routing:
        init["routing"] = jnp.zeros((n, max_new, cfg.num_layers, cfg.num_experts_per_tok), jnp.int32)

    def cond(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def body(c):
        step = c["step"]
        key, sub = jax.random.split(c["key"])
        s = sample(c["last"], sub, params)
        active = ~c["done"]
        tok = jnp.where(active, s.token, 0)
        put = lambda buf, x: buf.at[:, step].set(jnp.where(active, x, 0))  # noqa: E731
        run = jnp.where(s.prob > params.repetition_prob, c["run"] + 1, 0)
        reason = jnp.where(jnp.isin(tok, stop_ids), STOP, RUNNING)
        if params.repetition_window > 0:
            reason = jnp.where((reason == RUNNING) & (run >= params.repetition_window), REPETITION, reason)
        reason = jnp.where((reason == RUNNING) & (step + 1 >= max_new), LENGTH, reason)
        reason = jnp.where(active, reason, c["reason"])
        # NNX modules must be built in the trace that uses them: merge inside the loop body.
        logits, cache, routing = nnx.merge(graphdef, state).forward_with_cache(
            tok[:, None], as_model_takes(c["cache"]), p + step, None, (n_real + step)[:, None], return_routing=True)
        extra = {}
        if record_routing:  # the routing of the token just fed (the one sampled at this step)
            ids = jnp.where(active[:, None, None], routing.transpose(1, 0, 2), 0)
            extra["routing"] = c["routing"].at[:, step].set(ids)
        return dict(**extra,
            step=step + 1, cache=carried(cache), last=logits[:, 0], key=key, done=reason != RUNNING, reason=reason,
            run=run, lengths=c["lengths"] + active, tokens=put(c["tokens"], tok),
            logprobs=put(c["logprobs"], s.logprob), logprobs_truncated=put(c["logprobs_truncated"], s.logprob_truncated),
        )

    c = jax.lax.while_loop(cond, body, init)
    return Rollout(c["tokens"], c["logprobs"], c["logprobs_truncated"], c["lengths"], c["reason"],
                   c.get("routing"))


def generate(model: MiniMaxM1, prompts, params: SamplingParams, num_samples: int = 1, key=None,
             prompt_mask=None, prefill_chunk: int = 2048, record_routing: bool = False,
             kv_dtype: str | None = None) -> Rollout:
    """Sample ``num_samples`` completions per prompt.

    prompts: a list of token-id lists (left-padded here), or ids [B, P] with ``prompt_mask``.
    Returns a Rollout with N = B * num_samples rows (the samples of prompt i are rows
    i*num_samples ... i*num_samples + num_samples - 1). Prompts longer than ``prefill_chunk`` are
    prefilled chunk by chunk (left-padded to a multiple of it). ``record_routing`` adds the top-k
    expert ids of every prompt and completion token in every layer (Rollout.routing, .prompt_routing).
    ``kv_dtype`` (e.g. "bfloat16") stores the softmax layers' KV caches in that dtype: half the bytes
    a decode step streams at long context, at bfloat16 rounding of keys and values.
    """
    if prompt_mask is None:
        ids, mask = left_pad(prompts)
    else:
        ids, mask = np.asarray(prompts), np.asarray(prompt_mask)
    # Under a mesh the rows are split over its batch axes: a batch they do not divide gets copies
    # of its first prompt, sampled and dropped (the sharded lightning and MoE programs need equal shards).
    b = ids.shape[0]
    pad_rows = -b % batch_shards(current_mesh())
    if pad_rows:
        ids, mask = (np.concatenate([x, np.repeat(x[:1], pad_rows, axis=0)]) for x in (ids, mask))
    width = ids.shape[1]
    if width > prefill_chunk and width % prefill_chunk:
        extra = prefill_chunk - width % prefill_chunk
        ids, mask = np.pad(ids, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))
    key = jax.random.key(params.seed) if key is None else key
    graphdef, state = nnx.split(model)
    last, cache, n_real, prompt_routing = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                                  params.max_new_tokens, min(prefill_chunk, ids.shape[1]), kv_dtype)
    out = decode(graphdef, state, cache, last, n_real, ids.shape[1], key, params, num_samples, record_routing)
    out = out._replace(prompt_routing=prompt_routing) if record_routing else out
    if pad_rows:
        out = Rollout(*(None if x is None else x[:b * num_samples] for x in out[:-1]),
                      None if out.prompt_routing is None else out.prompt_routing[:b])
    return out
