"""CISPO (MiniMax-M1 §3.1) and its unified token mask (Eq. 6-7), with token weights for aggregation.

Per token, with r = pi_theta / pi_old (log-ratio clamped to +-log_ratio_clamp before exp):

    loss_t = - sg( clip(r, w_min, w_max) ) * A * log pi_theta(token) * M_t        (Eq. 4-7)

* The IS weight band is ABSOLUTE: [is_weight_min, is_weight_max] bounds r itself (default
  [0, 5]: no lower bound, as in the paper; 5 = ScaleRL's eps_max = TRL epsilon_high 5 = an offset
  of 4 in verl/slime/SkyRL's "1 + eps" convention). ``None`` disables a bound.
* The weight is detached: the gradient is -w A grad log pi for every token (only its scale is
  bounded), never the gradient of w (EasyDeL's bug) -- and log pi is always there (open-instruct's).
* M (Eq. 7) is PPO's trust-region mask: 0 where (A > 0 and r > 1 + mask_eps_high) or
  (A < 0 and r < 1 - mask_eps_low). Off by default (CISPO). With the IS clip off and the mask on,
  the gradient is exactly PPO-clip's: GRPO (0.2 / 0.2) or DAPO clip-higher (0.2 / 0.28). See
  ``PRESETS``.
* Optional truncated importance sampling against the sampler: tis = sg(min(pi_old / pi_sampler,
  tis_cap)) multiplies the loss as a separate factor (for pi_old recomputed by the trainer).

Aggregation is by per-token weights computed ONCE for the whole optimizer batch
(``token_weights``), so the loss is a plain sum over micro-batches and does not depend on how the
batch is split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32
AGGREGATIONS = ("token_mean", "sequence_mean", "prompt_token_mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    is_weight_min: float | None = 0.0
    is_weight_max: float | None = 5.0
    mask_eps_low: float | None = None  # unified mask (Eq. 7); None = off
    mask_eps_high: float | None = None
    aggregation: str = "token_mean"
    log_ratio_clamp: float = 20.0
    tis_cap: float | None = None  # truncated IS vs sampler log-probs; None = off

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation: must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        lo, hi = self.is_weight_min, self.is_weight_max
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"loss.is_weight_min={lo} must be < loss.is_weight_max={hi}.")
        if (self.mask_eps_low is None) != (self.mask_eps_high is None):
            raise ValueError("loss.mask_eps_low and loss.mask_eps_high: set both (mask on) or neither (off).")

    def describe(self) -> str:
        """One unambiguous line for the startup log."""
        band = f"IS weight clip(r, {self.is_weight_min}, {self.is_weight_max}) [absolute bounds on r]"
        mask = ("no trust-region mask" if self.mask_eps_low is None else
                f"mask M: r outside [1-{self.mask_eps_low}, 1+{self.mask_eps_high}] on the side of sign(A)")
        return f"loss = -sg({band}) * A * log pi * M; {mask}; aggregation {self.aggregation}"


PRESETS = {
    "cispo": LossConfig(),
    "grpo": LossConfig(is_weight_min=None, is_weight_max=None, mask_eps_low=0.2, mask_eps_high=0.2),
    "dapo": LossConfig(is_weight_min=None, is_weight_max=None, mask_eps_low=0.2, mask_eps_high=0.28),
}


def token_weights(mask, group_ids=None, aggregation: str = "token_mean"):
    """Weights w [B, T] with loss = sum(loss_t * w) over the optimizer batch.

    token_mean: m / sum(m)  (the paper's 1 / sum_i |o_i|);  sequence_mean: m / (|o_i| * B), B the
    sequences with tokens (a padding row has none and changes no weight);
    prompt_token_mean (the paper's "combined sample-level loss and token-level normalization",
    §5): each prompt group's tokens normalized by the group's token count, averaged over groups.
    mask [B, T] (1 = completion token); group_ids [B] (prompt index of each sequence).
    """
    m = mask.astype(F32)
    if aggregation == "token_mean":
        return m / jnp.maximum(m.sum(), 1.0)
    lengths = m.sum(axis=1, keepdims=True)
    if aggregation == "sequence_mean":
        return m / jnp.maximum(lengths, 1.0) / jnp.maximum(jnp.sum(lengths > 0), 1)
    if group_ids is None:
        raise ValueError("prompt_token_mean aggregation needs group_ids.")
    onehot = jax.nn.one_hot(group_ids, m.shape[0], dtype=F32)  # at most B groups
    group_tokens = onehot.T @ lengths[:, 0]  # [num_groups]
    n_groups = jnp.sum(group_tokens > 0)
    return m / jnp.maximum(onehot @ group_tokens, 1.0)[:, None] / n_groups


def per_token_loss(logp, old_logp, advantages, cfg: LossConfig, sampler_logp=None):
    """Per-token CISPO loss [B, T] (unweighted) and metrics. logp: log pi_theta of the taken tokens
    [B, T]; old_logp: pi_old's (the sampler's or recomputed) [B, T]; advantages [B] or [B, T]."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    log_ratio = jnp.clip(logp - old_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    weight = ratio
    if cfg.is_weight_min is not None or cfg.is_weight_max is not None:
        weight = jnp.clip(ratio, cfg.is_weight_min, cfg.is_weight_max)
    weight = jax.lax.stop_gradient(weight)
    keep = jnp.ones_like(ratio)
    if cfg.mask_eps_low is not None:
        out = ((adv > 0) & (ratio > 1 + cfg.mask_eps_high)) | ((adv < 0) & (ratio < 1 - cfg.mask_eps_low))
        keep = jax.lax.stop_gradient(jnp.where(out, 0.0, 1.0))
    factor = weight * keep
    tis = jnp.ones_like(ratio)
    if cfg.tis_cap is not None and sampler_logp is not None:
        tis = jax.lax.stop_gradient(jnp.minimum(
            jnp.exp(jnp.clip(old_logp - sampler_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)), cfg.tis_cap))
        factor = factor * tis
    loss = -factor * adv * logp
    clipped = jnp.zeros_like(ratio, bool)
    if cfg.is_weight_max is not None:
        clipped |= ratio > cfg.is_weight_max
    if cfg.is_weight_min is not None:
        clipped |= ratio < cfg.is_weight_min
    return loss, {"ratio": jax.lax.stop_gradient(ratio), "weight": weight, "clipped": clipped, "mask": keep,
                  "tis": tis}


def cispo_loss(logp, old_logp, advantages, weights, cfg: LossConfig, sampler_logp=None):
    """sum(per_token_loss * weights) and metrics: weighted means of the IS weight and of the TIS
    factor, fractions clipped and masked (scalars), and "ratio", r per token [B, T] (for percentiles
    over the batch)."""
    loss, aux = per_token_loss(logp, old_logp, advantages, cfg, sampler_logp)
    w = weights.astype(F32)
    total = jnp.sum(loss * w)
    share = w / jnp.maximum(jnp.sum(w), 1e-30)
    metrics = {
        "is_weight_mean": jnp.sum(aux["weight"] * share),
        "is_clipped_frac": jnp.sum(aux["clipped"] * share),
        "masked_frac": jnp.sum((1 - aux["mask"]) * share),
        "tis_weight_mean": jnp.sum(aux["tis"] * share),  # 1 when TIS is off
        "ratio": aux["ratio"],
    }
    return total, metrics
