"""Jitted training steps: supervised warm start and CISPO updates (one source for train.py and tests)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m1jax.lm import token_logprobs, token_logprobs_and_entropy
from m1jax.rl.cispo import LossConfig, cispo_loss
from m1jax.sharding import constrain_state


@nnx.jit
def sft_step(model, optimizer, ids, loss_mask):
    """Cross-entropy on the tokens where loss_mask[:, t] = 1 (t >= 1), + router aux loss."""

    def loss_fn(model):
        lp, aux = token_logprobs(model, ids)
        m = loss_mask[:, 1:].astype(jnp.float32)
        ce = -jnp.sum(lp * m) / jnp.maximum(m.sum(), 1.0)
        return ce + model.cfg.router_aux_loss_coef * aux, ce

    (loss, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    gnorm = optax.tree.norm(grads)
    optimizer.update(model, grads)  # the optax chain skips non-finite updates (optax.apply_if_finite)
    constrain_state(model)
    return {"sft_loss": ce, "grad_norm": gnorm, "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm)}


@nnx.jit(static_argnames=("cfg", "temperature"))
def cispo_step(model, optimizer, ids, comp_mask, old_logp, advantages, weights, cfg: LossConfig,
               sampler_logp=None, temperature: float = 1.0, max_grad_norm=None, expert_ids=None):
    """One CISPO update on a minibatch. ids [B, T] (prompt + completion); comp_mask [B, T-1] marks
    completion targets; old_logp [B, T-1] (pi_old at those targets); weights [B, T-1] from
    token_weights over the whole optimizer batch; sampler_logp [B, T-1] feeds the optional truncated
    IS factor (cfg.tis_cap) when old_logp was recomputed by the trainer. The policy is pi_T, the
    sampling temperature's distribution. max_grad_norm (a scalar array, optional): the gradient is
    clipped to this global norm before the optimizer (a length stage's clip; the optimizer's own clip
    comes after). expert_ids (optional [num_layers, B, T, top_k]): the sampler's routing, replayed
    (R3: the MoE uses these experts, the router only weights them). Returns scalar metrics
    (grad_norm before clipping), "ratio" [B, T-1] (r per token), and "logp" and "entropy" [B, T-1]:
    log pi_T of the targets and pi_T's full-vocabulary entropy before this update (policy_stats'
    values, from the loss's own forward)."""
    chex.assert_rank(ids, 2)
    targets = (ids.shape[0], ids.shape[1] - 1)
    chex.assert_shape([comp_mask, old_logp, weights] + ([] if sampler_logp is None else [sampler_logp]), targets)
    chex.assert_shape(advantages, (ids.shape[0],) if advantages.ndim == 1 else targets)

    def loss_fn(model):
        lp, entropy, aux = token_logprobs_and_entropy(model, ids, temperature=temperature, expert_ids=expert_ids)
        loss, metrics = cispo_loss(lp, old_logp, advantages, weights * comp_mask, cfg, sampler_logp)
        nll = -jnp.sum(lp * weights * comp_mask)  # weighted mean -log pi_T of the sampled tokens
        metrics.update(nll=nll, logp=jax.lax.stop_gradient(lp), entropy=jax.lax.stop_gradient(entropy))
        return loss + model.cfg.router_aux_loss_coef * aux * jnp.sum(weights * comp_mask), metrics

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    if max_grad_norm is not None:  # as optax.clip_by_global_norm
        grads = jax.tree.map(lambda g: jnp.where(gnorm < max_grad_norm, g, g / gnorm * max_grad_norm), grads)
    optimizer.update(model, grads)  # the optax chain skips non-finite updates (optax.apply_if_finite)
    constrain_state(model)
    return {"loss": loss, "grad_norm": gnorm, "finite": finite, **metrics}


@nnx.jit(static_argnames=("temperature",))
def policy_stats(model, ids, temperature: float = 1.0, expert_ids=None):
    """The current policy pi_T on sampled sequences ids [B, T], no gradient: log pi_T of every target
    token and the full-vocabulary entropy of pi_T at every position, both [B, T-1] (with the
    sampler's routing replayed when expert_ids is given)."""
    lp, entropy, _ = token_logprobs_and_entropy(model, ids, temperature=temperature, expert_ids=expert_ids)
    return lp, entropy
