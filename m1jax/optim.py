"""The optimizer: an optax chain built from config (MiniMax-M1 RL recipe defaults).

    clip_by_global_norm(max_grad_norm)
    -> AdamW(b1=0.9, b2=0.95, eps=1e-15, eps_root=0, float32 moments, weight_decay)
    -> learning rate = warmup (linear from 0) then constant or cosine decay
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import optax

from m1jax.model.config import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" | "cosine"
    total_steps: int = 0  # cosine: the schedule's length in updates, warmup included (min_lr_ratio there)
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ValueError(f"optim.{key}: {msg}")

        need(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}.")
        need(self.schedule in ("constant", "cosine"), "schedule", f"must be 'constant' or 'cosine', got {self.schedule!r}.")
        need(self.schedule != "cosine" or self.total_steps > 0, "total_steps",
             "must be > 0 with schedule='cosine' (the decay horizon).")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1/b2", f"must be in [0, 1), got {self.b1}, {self.b2}.")
        need(self.eps >= 0 and self.warmup_steps >= 0, "eps/warmup_steps", "must be >= 0.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], section: str = "optim") -> "OptimConfig":
        return dataclass_from_dict(cls, d, section)


def schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        # from the end of the warmup to total_steps (at least one update: a run shorter than its warmup)
        after = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.total_steps - cfg.warmup_steps, 1),
                                            alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0,
            mu_dtype=jnp.float32, weight_decay=cfg.weight_decay,
        )
    )
    # A non-finite gradient leaves parameters and moments untouched (the step is skipped and
    # counted); train.py stops with an error after a run of them.
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=1_000_000)
