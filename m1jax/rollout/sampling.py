"""Token sampling with sampler log-probs (one source of truth for rollout and its tests).

Log-prob semantics (the RL trainer needs exactly these; docs/rollout.md):

* ``logprob``: log-softmax over the FULL vocabulary of the temperature-scaled logits, at the
  sampled token: log pi_T(y) with pi_T = softmax(logits / T). With T = 1 this is exactly what the
  training forward computes, so it is the value to use as pi_old in importance weights.
* ``logprob_truncated``: the same after top-k / top-p truncation and renormalization, i.e. the
  log-probability under the distribution the token was actually drawn from.
* Greedy decoding reports log-softmax of the raw logits (T = 1) for both.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    greedy: bool = False
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    # Early truncation by repetition (paper §3.2): stop after this many consecutive tokens each
    # sampled with probability > repetition_prob. 0 disables.
    repetition_window: int = 0
    repetition_prob: float = 0.99
    seed: int = 0

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ValueError(f"sampling.{key}: {msg}")

        need(self.greedy or self.temperature > 0, "temperature", "must be > 0 (or set greedy=True).")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}.")
        need(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables), got {self.top_k}.")
        need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}.")
        need(0 < self.repetition_prob < 1, "repetition_prob", f"must be in (0, 1), got {self.repetition_prob}.")


class Sample(NamedTuple):
    token: jax.Array  # [B] int32
    logprob: jax.Array  # [B] full-vocabulary log pi_T(token)
    logprob_truncated: jax.Array  # [B] log-prob under the truncated, renormalized distribution
    prob: jax.Array  # [B] exp(logprob): the repetition detector's input


def truncate(scaled, top_k: int, top_p: float):
    """Mask (to -inf) all but the top-k tokens and the smallest set whose probability reaches top_p.

    Sort-free (a sort over the vocabulary is the slowest op of a CPU decode step): a token is kept
    by top-p iff the tokens strictly more likely than it hold less than ``top_p`` of the mass —
    the definition of the sorted-cumsum rule — and that holds exactly for the probabilities at or
    above a threshold, found by bisecting over the float32 bit patterns (31 masked sums). Tied
    tokens are kept or dropped together, independent of their order in the vocabulary.
    """
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    if top_p >= 1.0:
        return scaled
    probs = jax.nn.softmax(scaled, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # ordered like the probabilities (all >= 0)

    def mass_above(b):  # [B, 1] bit pattern -> [B, 1] probability mass strictly above it
        return jnp.sum(jnp.where(bits > b, probs, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):  # invariant: mass_above(lo) >= top_p > mass_above(hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    hi = jnp.max(bits, axis=-1, keepdims=True)
    _, hi = jax.lax.fori_loop(0, 31, halve, (jnp.full_like(hi, -1), hi), unroll=True)
    return jnp.where(bits >= hi, scaled, -jnp.inf)


def sample(logits, key, params: SamplingParams) -> Sample:
    """logits [B, V] (float32) -> Sample. ``key``: one key for the batch, or a key per row [B]
    (row b's token then depends on its key and logits only, not on the batch it is in)."""
    logits = logits.astype(F32)
    if params.greedy:
        token = jnp.argmax(logits, axis=-1)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return Sample(token.astype(jnp.int32), lp, lp, jnp.exp(lp))
    scaled = logits / params.temperature
    full = jax.nn.log_softmax(scaled)
    masked = truncate(scaled, params.top_k, params.top_p)
    if key.ndim:
        token = jax.vmap(jax.random.categorical)(key, masked)
    else:
        token = jax.random.categorical(key, masked, axis=-1)
    at = lambda x: jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]  # noqa: E731
    lp = at(full)
    return Sample(token.astype(jnp.int32), lp, at(jax.nn.log_softmax(masked)), jnp.exp(lp))
