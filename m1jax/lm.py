"""Language-model loss and a generic optimizer step (SFT warm start, tests, benchmarks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m1jax.model import MiniMaxM1
from m1jax.model.moe import load_balancing_loss
from m1jax.sharding import constrain_state


def _policy_log_softmax(model: MiniMaxM1, ids, mask, temperature: float, expert_ids=None):
    """log softmax(logits / T) over the full vocabulary at positions 0..T-2: [B, T-1, V] (fp32)."""
    out = model.forward(ids, attention_mask=mask, expert_ids=expert_ids)
    logits = out.logits[:, :-1].astype(jnp.float32)
    if temperature != 1.0:  # a Python-level branch: T = 1 leaves the graph untouched
        logits = logits / temperature
    return jax.nn.log_softmax(logits), out.aux_loss


# Target log-probs are computed this many sequence positions at a time: the float32 logits of a
# long sequence ([batch, seq, vocab]: 9 GiB per chip for one 90K-token sequence of the real model at
# tensor=8, with as much again for log_softmax and the gradient) never exist whole.
LOGITS_CHUNK = 4096


def target_logprobs(head, h, targets, temperature: float = 1.0, chunk: int = LOGITS_CHUNK):
    """log softmax(head(h) / T)[targets] for hidden states h [B, S, D] and targets [B, S]: [B, S]
    float32, ``chunk`` positions at a time (rematerialized in the backward pass: one more LM-head
    matmul instead of the [B, S, V] logits and their gradient).

    Chunks are strided (chunk i holds positions i, i + n, i + 2n, ...), so each one spans every
    shard of a sequence-sharded S and no position moves between devices."""
    b, s, d = h.shape
    n = -(-s // chunk)  # chunks
    m = -(-s // n)  # positions per chunk
    h = jnp.pad(h, ((0, 0), (0, n * m - s), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, n * m - s)))

    @jax.checkpoint
    def one(_, xs):
        h_c, t_c = xs  # [B, m, D], [B, m]
        logits = head(h_c).astype(jnp.float32)
        if temperature != 1.0:  # a Python-level branch: T = 1 leaves the graph untouched
            logits = logits / temperature
        return None, jnp.take_along_axis(jax.nn.log_softmax(logits), t_c[..., None], -1)[..., 0]

    strided = lambda x: jnp.moveaxis(x.reshape(b, m, n, *x.shape[2:]), 2, 0)  # noqa: E731 -- [n, B, m, ...]
    _, lp = jax.lax.scan(one, None, (strided(h), strided(targets)))  # [n, B, m]
    return jnp.moveaxis(lp, 0, 2).reshape(b, n * m)[:, :s]


def token_logprobs(model: MiniMaxM1, ids, mask=None, temperature: float = 1.0, expert_ids=None):
    """log pi_T(ids[:, t] | ids[:, <t]) for t >= 1: [B, T-1], and the forward's aux loss.

    pi_T = softmax(logits / T), the distribution the rollout samples from at temperature T (its
    sampler log-probs are of the same pi_T, see m1jax/rollout/sampling.py). expert_ids: optional
    [num_layers, B, T, top_k] routing to replay (``MiniMaxM1.hidden_states``)."""
    h, stats, _ = model.hidden_states(ids, attention_mask=mask, expert_ids=expert_ids)
    lp = target_logprobs(model.logits, h[:, :-1], ids[:, 1:], temperature)
    return lp, load_balancing_loss(stats, model.cfg.num_experts)


def token_logprobs_and_entropy(model: MiniMaxM1, ids, mask=None, temperature: float = 1.0, expert_ids=None):
    """``token_logprobs`` and, from the same forward, the full-vocabulary entropy of pi_T at every
    position, H_t = -sum_v pi_T(v) log pi_T(v): ([B, T-1], [B, T-1], aux loss)."""
    logp, aux = _policy_log_softmax(model, ids, mask, temperature, expert_ids)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0], entropy, aux


def lm_loss(model: MiniMaxM1, ids, mask=None):
    """Next-token cross-entropy (mean over predicted tokens with mask 1) + coef * aux loss.

    ids [batch, seq]; mask [batch, seq] (1 = token counted as a target and attended). Returns
    (loss, metrics dict).
    """
    lp, aux = token_logprobs(model, ids, mask)
    w = jnp.ones_like(lp) if mask is None else (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    ce = -jnp.sum(lp * w) / jnp.maximum(jnp.sum(w), 1.0)
    return ce + model.cfg.router_aux_loss_coef * aux, {"ce": ce, "aux": aux}


def make_train_step(loss_fn=lm_loss):
    """``step(model, optimizer, *batch) -> metrics``, updating model and optimizer in place."""

    @nnx.jit
    def step(model, optimizer, *batch):
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, *batch)
        optimizer.update(model, grads)
        constrain_state(model)
        constrain_state(optimizer)
        return {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return step
