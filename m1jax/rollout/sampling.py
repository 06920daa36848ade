"""Token sampling with sampler log-probs (one source of truth for rollout and its tests).

Log-prob semantics (see shared/spec/rl-landscape.md §5 for how peers get this wrong):

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
    """Mask (to -inf) all but the top-k tokens and the smallest set whose probability reaches top_p."""
    if top_k <= 0 and top_p >= 1.0:
        return scaled
    vocab = scaled.shape[-1]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    keep = jnp.ones_like(sorted_logits, bool)
    if top_k > 0:
        keep &= jnp.arange(vocab) < top_k
    if top_p < 1.0:
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep &= before < top_p  # the first token is always kept
    masked_sorted = jnp.where(keep, sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(masked_sorted, inverse, axis=-1)


def sample(logits, key, params: SamplingParams) -> Sample:
    """logits [B, V] (float32) -> Sample."""
    logits = logits.astype(F32)
    if params.greedy:
        token = jnp.argmax(logits, axis=-1)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return Sample(token.astype(jnp.int32), lp, lp, jnp.exp(lp))
    scaled = logits / params.temperature
    full = jax.nn.log_softmax(scaled)
    masked = truncate(scaled, params.top_k, params.top_p)
    token = jax.random.categorical(key, masked, axis=-1)
    at = lambda x: jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]  # noqa: E731
    lp = at(full)
    return Sample(token.astype(jnp.int32), lp, at(jax.nn.log_softmax(masked)), jnp.exp(lp))
