from m1jax.rl.advantages import group_advantages, groups_with_signal, overlong_penalty
from m1jax.rl.cispo import PRESETS, LossConfig, cispo_loss, per_token_loss, token_weights
from m1jax.rl.learner import Collected, NonFiniteGuard, RLConfig, RLLearner

__all__ = ["group_advantages", "groups_with_signal", "overlong_penalty", "PRESETS", "LossConfig", "cispo_loss",
           "per_token_loss", "token_weights", "Collected", "NonFiniteGuard", "RLConfig", "RLLearner"]
