"""Language-model loss and a generic optimizer step (SFT warm start, tests, benchmarks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m1jax.model import MiniMaxM1
from m1jax.sharding import constrain_state


def token_logprobs(model: MiniMaxM1, ids, mask=None):
    """log pi(ids[:, t] | ids[:, <t]) for t >= 1: [B, T-1], and the forward's aux loss."""
    out = model.forward(ids, attention_mask=mask)
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32))
    return jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0], out.aux_loss


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
