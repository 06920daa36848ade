"""Continuous batching: ``slots`` sequences decode together over one hybrid cache, and a slot whose
sample has finished takes the next pending sample between two decode segments.

RL completions are long-tailed: a static batch (``generate``) runs until its longest sample ends,
while most of its rows sit finished. Here a decode *segment* is one compiled ``lax.while_loop`` of
at most ``segment`` steps that returns early once ``refill`` slots are free; the host then writes
the next samples into the free slots and starts the next segment. Nothing recompiles for new
prompts: the prefill and the insert compile once per prompt bucket (a power of two from 16 up to
the prefill chunk, then multiples of it), the segment once.

The cache layout is the same for every sample, whatever slot it runs in: a slot has
``prompt_width`` prompt columns (its prompt right-aligned in them, after its own bucket's left
padding) then ``max_new_tokens`` columns for the completion, and token t of a sample always goes to
column ``prompt_width + t``. A prompt is prefilled once, on its own, into a cache of its bucket's
width; each of its samples copies that into a slot (the fork) and resets the slot's lightning
states, KV columns, key mask and counters. Each sample draws with a key of its own,
fold_in(fold_in(key, prompt index), sample index) folded with its step, and the experts run
batch-invariant (``m1jax.model.cpu.batch_invariant``). So a sample's tokens, log-probs and finish reason depend
only on the key, its prompt and indices, the model and the engine's widths: never on the slot,
its neighbours or the refill order, and continuous and static batching (``continuous=False``: a
wave of samples, refilled only when all have finished) give the same samples bit for bit.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax import distributed
from m1jax.model.cpu import batch_invariant
from m1jax.rollout.engine import (ERROR, LENGTH, REPETITION, RUNNING, STOP, Rollout, _jit, _loop_layout,
                                  left_pad, prefill)
from m1jax.rollout.sampling import SamplingParams, sample
from m1jax.sharding import batch_shards, batch_spec, current_mesh


class SlotRun(NamedTuple):
    rollout: Rollout  # rows p * num_samples + g, as ``generate``; a failed prompt's rows are empty
    errors: dict  # prompt position -> why its samples were not generated (finish reason "error")
    slot_steps: int  # decode steps run x slots
    busy_steps: int  # the slot-steps that generated a token (the useful tokens)
    segments: int

    @property
    def occupancy(self) -> float:
        return self.busy_steps / max(self.slot_steps, 1)


def check_engine_config(ro) -> None:
    """The engine settings of a config's ``rollout`` section (engine, slots, kv_dtype), checked before
    anything compiles; rollout.py and train.py share them."""
    if ro.get("engine", "continuous") not in ("continuous", "static"):
        raise ValueError(f"rollout.engine={ro['engine']!r}: use 'continuous' (the slot engine) or 'static'.")
    slots = ro.get("slots", 0)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        raise ValueError(f"rollout.slots={slots!r}: must be an integer >= 0 (0: one slot per sample of a call).")
    kv = ro.get("kv_dtype", "")
    if kv not in ("", "float32", "bfloat16"):
        raise ValueError(f"rollout.kv_dtype={kv!r}: use '' (the model's compute dtype), 'float32' or 'bfloat16'.")


def prompt_bucket(n: int, chunk: int) -> int:
    """The width a prompt of n tokens is prefilled at: a power of two from 16 up to ``chunk``,
    past it a multiple of ``chunk`` (the prefill runs chunk by chunk)."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(max(16, 1 << (max(n, 1) - 1).bit_length()), chunk)


def _per_slot(path) -> str:
    return path[-1].key if hasattr(path[-1], "key") else ""


@_jit(static_argnames=("graphdef", "slots", "prompt_width", "max_new", "kv_dtype", "record_routing"))
def _init(graphdef, state, slots: int, prompt_width: int, max_new: int, kv_dtype: str | None, record_routing: bool):
    """Empty slots: a zero cache of prompt_width + max_new columns, every slot inactive."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    cache = model.init_cache(slots, prompt_width + max_new, kv_dtype and jnp.dtype(kv_dtype))
    f32 = jnp.zeros((slots, max_new), jnp.float32)
    i32 = jnp.zeros((slots,), jnp.int32)
    out = dict(cache=cache, last=jnp.zeros((slots, cfg.vocab_size), jnp.float32), key=jnp.zeros((slots, 2), jnp.uint32),
               t=i32, n_real=i32, limit=i32, run=i32, reason=i32, active=jnp.zeros((slots,), bool),
               tokens=jnp.zeros((slots, max_new), jnp.int32), logprobs=f32, logprobs_truncated=f32)
    if record_routing:
        out["routing"] = jnp.zeros((slots, max_new, cfg.num_layers, cfg.num_experts_per_tok), jnp.int32)
    mesh = current_mesh()
    if mesh is not None:  # slots split over the batch axes, like the rows of a batch
        spec = batch_spec(mesh)

        def shard(path, x):
            axis = 1 if _per_slot(path) in ("state", "k", "v") else 0  # layer entries: [repeats, batch, ...]
            dims = [None] * x.ndim
            dims[axis] = spec
            return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*dims))

        out = jax.tree_util.tree_map_with_path(shard, out)
    return out


def _fresh_entry(name: str, big, small, s, at):
    """Cache entry ``big`` (all slots) with slot s set from row 0 of a prefilled prompt's ``small``:
    a lightning state replaced, the prompt's k/v written at columns at.., and the key mask's whole
    row rewritten, so that the columns the slot's previous sample wrote are masked."""
    if name == "key_valid":
        row = jnp.zeros((1, big.shape[1]), big.dtype)
        return jax.lax.dynamic_update_slice(big, jax.lax.dynamic_update_slice(row, small[:1], (0, at)), (s, 0))
    start = (0, s, 0, at, 0) if name in ("k", "v") else (0, s) + (0,) * (big.ndim - 2)
    return jax.lax.dynamic_update_slice(big, small[:, :1].astype(big.dtype), start)


@functools.partial(jax.jit, static_argnames=("prompt_width",), donate_argnames=("slots",))
def _insert(slots, s, count, cache, last, n_real, key, prompt_index, sample_index, limit, prompt_width: int):
    """Slots s[:count] := fresh samples sample_index[:count] of one prefilled prompt (row 0 of
    ``cache``, its bucket's width), with limits limit[:count]: its lightning states and KV columns
    copied in, the key mask and every counter reset. s, sample_index, limit: [k] (k: the compiled
    size, entries past count ignored), one call for all of a prompt's samples that start now."""
    at = prompt_width - cache["key_valid"].shape[1]  # the prompt's columns end where the completion's begin
    base = jax.random.fold_in(key, prompt_index)

    def one(i, slots):
        si = s[i]
        out = dict(slots)
        out["cache"] = jax.tree_util.tree_map_with_path(
            lambda path, big, small: _fresh_entry(_per_slot(path), big, small, si, at), slots["cache"], cache)
        out["key"] = slots["key"].at[si].set(jax.random.key_data(jax.random.fold_in(base, sample_index[i])))
        out["last"] = slots["last"].at[si].set(last[0])
        for name, value in (("t", 0), ("n_real", n_real[0]), ("limit", limit[i]), ("run", 0), ("reason", RUNNING)):
            out[name] = slots[name].at[si].set(value)
        out["active"] = slots["active"].at[si].set(True)
        for name in ("tokens", "logprobs", "logprobs_truncated") + (("routing",) if "routing" in slots else ()):
            out[name] = slots[name].at[si].set(0)
        return out

    return jax.lax.fori_loop(0, count, one, slots)


@_jit(static_argnames=("graphdef", "params", "steps", "prompt_width"), donate_argnames=("slots",))
def _segment(graphdef, state, slots, min_free, params: SamplingParams, steps: int, prompt_width: int):
    """At most ``steps`` decode steps of every slot, stopping early once ``min_free`` slots are
    inactive. Returns (slots, steps run, tokens generated)."""
    cfg = nnx.merge(graphdef, state).cfg
    carried = functools.partial(_loop_layout, repeats=cfg.pattern[1], into_loop=True)
    as_model_takes = functools.partial(_loop_layout, repeats=cfg.pattern[1], into_loop=False)
    stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    max_new = slots["tokens"].shape[1]
    rows = jnp.arange(slots["t"].shape[0])
    record = "routing" in slots

    def cond(c):
        s = c["slots"]
        return (c["i"] < steps) & jnp.any(s["active"]) & (jnp.sum(~s["active"]) < min_free)

    def body(c):
        s = dict(c["slots"])
        t, active = s["t"], s["active"]
        keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.wrap_key_data(k), t))(s["key"], t)
        x = sample(s["last"], keys, params)
        tok = jnp.where(active, x.token, 0)
        col = jnp.minimum(t, max_new - 1)  # a finished slot keeps computing (ignored) at its last column
        put = lambda buf, v: buf.at[rows, col].set(jnp.where(active, v, buf[rows, col]))  # noqa: E731
        run = jnp.where(x.prob > params.repetition_prob, s["run"] + 1, 0)
        reason = jnp.where(jnp.isin(tok, stop_ids), STOP, RUNNING)
        if params.repetition_window > 0:
            reason = jnp.where((reason == RUNNING) & (run >= params.repetition_window), REPETITION, reason)
        reason = jnp.where((reason == RUNNING) & (t + 1 >= s["limit"]), LENGTH, reason)
        logits, cache, routing = nnx.merge(graphdef, state).forward_with_cache(
            tok[:, None], as_model_takes(s["cache"]), prompt_width + col, None, (s["n_real"] + t)[:, None],
            return_routing=True)
        if record:  # the routing of the token just fed (the one sampled at this step)
            s["routing"] = s["routing"].at[rows, col].set(
                jnp.where(active[:, None, None], routing.transpose(1, 0, 2), s["routing"][rows, col]))
        s.update(cache=carried(cache), last=logits[:, 0], tokens=put(s["tokens"], tok),
                 logprobs=put(s["logprobs"], x.logprob), logprobs_truncated=put(s["logprobs_truncated"],
                                                                                x.logprob_truncated),
                 run=jnp.where(active, run, s["run"]), reason=jnp.where(active, reason, s["reason"]),
                 t=t + active, active=active & (reason == RUNNING))
        return dict(slots=s, i=c["i"] + 1, busy=c["busy"] + jnp.sum(active, dtype=jnp.int32))

    slots = dict(slots, cache=carried(slots["cache"]))
    with batch_invariant():  # a row's experts never depend on the other rows
        c = jax.lax.while_loop(cond, body, dict(slots=slots, i=jnp.int32(0), busy=jnp.int32(0)))
    out = dict(c["slots"])
    out["cache"] = as_model_takes(out["cache"])
    return out, c["i"], c["busy"]


def generate_slots(model, prompts: Sequence[Sequence[int]], params: SamplingParams, num_samples: int = 1, *,
                   slots: int = 32, max_new_tokens=None, prompt_index: Sequence[int] | None = None, key=None,
                   prompt_width: int | None = None, prefill_chunk: int = 2048, segment: int = 128,
                   refill: int | None = None, continuous: bool = True, kv_dtype: str | None = None,
                   record_routing: bool = False, on_done=None) -> SlotRun:
    """Sample ``num_samples`` completions of each prompt on ``slots`` slots.

    prompts: token-id lists. max_new_tokens: each prompt's limit ([P]) or each sample's
    ([P, num_samples]), at most ``params.max_new_tokens`` (the width of the slots' completion
    columns); default that width. prompt_index: the index each prompt's samples fold into the key
    (default 0..P-1): pass the prompts' global indices so that a sample is the same in any subset
    of prompts (``rollout.py --resume``). prompt_width: the slots' prompt columns (default the
    bucket of the longest prompt); fix it, as the key, to get the same samples from different
    calls. ``refill``: a segment returns once this many slots are free (default slots // 16).
    continuous=False: static batching on the same slots (a wave runs until all its samples end).
    ``on_done(p, rollout)``, if given, is called as soon as all samples of prompt p have ended, with
    a Rollout of their num_samples rows (host arrays), e.g. to write them out while the rest run.

    A prompt that cannot run (empty, longer than prompt_width, ids outside the vocabulary, a limit
    outside [1, max_new_tokens]) gets finish reason "error" and its message in ``errors``; the
    other prompts run. Returns a SlotRun.
    """
    cfg = model.cfg
    n_prompts, g, cap = len(prompts), num_samples, params.max_new_tokens
    limits = np.broadcast_to(np.asarray(cap if max_new_tokens is None else max_new_tokens, np.int64).reshape(
        (-1, 1) if np.ndim(max_new_tokens) == 1 else np.shape(max_new_tokens)), (n_prompts, g))
    prompt_index = list(range(n_prompts)) if prompt_index is None else list(prompt_index)
    if len(prompt_index) != n_prompts:
        raise ValueError(f"prompt_index has {len(prompt_index)} entries for {n_prompts} prompts.")
    shards = batch_shards(current_mesh())
    if slots < 1 or slots % shards:
        raise ValueError(f"slots={slots}: must be a positive multiple of the mesh's {shards} batch shards.")
    longest = max((len(p) for p in prompts), default=1)
    width = prompt_bucket(prompt_width or longest, prefill_chunk)
    errors = {}
    for p, ids in enumerate(prompts):
        bad = [x for x in ids if not 0 <= x < cfg.vocab_size]
        if not len(ids):
            errors[p] = "empty prompt"
        elif len(ids) > width:
            errors[p] = f"prompt has {len(ids)} tokens > the slots' prompt width {width}"
        elif bad:
            errors[p] = f"token ids {sorted(set(bad))[:5]} outside the vocabulary [0, {cfg.vocab_size})"
        elif not np.all((limits[p] >= 1) & (limits[p] <= cap)):
            errors[p] = f"max_new_tokens {limits[p].tolist()} outside [1, sampling max_new_tokens={cap}]"
    key = jax.random.key(params.seed) if key is None else key
    refill = max(1, slots // 16) if refill is None else refill
    graphdef, state = nnx.split(model)

    routing_shape = (cfg.num_layers, cfg.num_experts_per_tok)
    dev = _init(graphdef, state, slots, width, cap, kv_dtype, record_routing)

    n = n_prompts * g
    out = dict(tokens=np.zeros((n, cap), np.int32), logprobs=np.zeros((n, cap), np.float32),
               logprobs_truncated=np.zeros((n, cap), np.float32), lengths=np.zeros((n,), np.int32),
               finish_reason=np.full((n,), ERROR, np.int32))
    if record_routing:
        out["routing"] = np.zeros((n, cap, *routing_shape), np.int32)
        prompt_routing = np.zeros((n_prompts, width, *routing_shape), np.int32)
    pending = collections.deque((p, j) for p in range(n_prompts) if p not in errors for j in range(g))
    prefilled, left = {}, collections.Counter(p for p, _ in pending)
    unfinished = collections.Counter(left)

    def prefill_prompt(p):
        ids, mask = left_pad([prompts[p]] * shards)
        pad = prompt_bucket(len(prompts[p]), prefill_chunk) - ids.shape[1]
        ids, mask = np.pad(ids, ((0, 0), (pad, 0))), np.pad(mask, ((0, 0), (pad, 0)))
        last, cache, n_real, routing = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), 0,
                                               min(prefill_chunk, ids.shape[1]), kv_dtype)
        if record_routing:
            prompt_routing[p, width - ids.shape[1]:] = np.asarray(distributed.fetch(routing))[0]
        return cache, last, n_real

    running = {}  # slot -> (prompt, sample)
    free = list(range(slots))
    slot_steps = busy = segments = 0
    while pending or running:
        if continuous or not running:
            while free and pending:
                p = pending[0][0]
                if p not in prefilled:
                    prefilled[p] = prefill_prompt(p)
                # the samples of prompt p that start now: one insert for all of them
                starting = []
                while free and pending and pending[0][0] == p:
                    starting.append((free.pop(0), pending.popleft()[1]))
                # host arrays padded to g entries: the insert compiles once per prompt bucket
                into, js, lim = np.zeros((3, g), np.int32)
                for i, (s, j) in enumerate(starting):
                    into[i], js[i], lim[i] = s, j, limits[p, j]
                    running[s] = (p, j)
                dev = _insert(dev, into, np.int32(len(starting)), *prefilled[p], key, np.int32(prompt_index[p]), js, lim,
                              width)
                left[p] -= len(starting)
                if not left[p]:
                    del prefilled[p]  # every sample of it has started
        want = len(free) + refill if continuous and pending else slots
        dev, steps, tokens = _segment(graphdef, state, dev, np.int32(min(want, slots)), params, segment, width)
        segments += 1
        active = np.asarray(distributed.fetch(dev["active"]))
        steps, tokens = int(steps), int(tokens)
        slot_steps, busy = slot_steps + steps * slots, busy + tokens
        ended = [s for s in running if not active[s]]
        if ended:
            names = ["t", "reason", "tokens", "logprobs", "logprobs_truncated"] + (["routing"] * record_routing)
            host = distributed.fetch({k: dev[k] for k in names})
            for s in ended:
                p, j = running.pop(s)
                row = p * g + j
                out["lengths"][row], out["finish_reason"][row] = host["t"][s], host["reason"][s]
                for k in names[2:]:
                    out[k][row] = host[k][s]
                free.append(s)
                unfinished[p] -= 1
                if not unfinished[p] and on_done is not None:
                    rows = slice(p * g, (p + 1) * g)
                    on_done(p, Rollout(**{k: v[rows] for k, v in out.items()},
                                       **({"prompt_routing": prompt_routing[p:p + 1]} if record_routing else {})))
            free.sort()
    rollout = Rollout(**out, **({"prompt_routing": prompt_routing} if record_routing else {}))
    return SlotRun(rollout, errors, slot_steps, busy, segments)
