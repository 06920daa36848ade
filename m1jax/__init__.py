"""m1jax: MiniMax-M1 (hybrid lightning-attention MoE) in JAX: model, kernels, rollout, CISPO RL."""

from m1jax.model import ConfigError, MiniMaxM1, ModelConfig, hybrid_layer_types

__version__ = "0.1.0"
__all__ = ["ConfigError", "MiniMaxM1", "ModelConfig", "hybrid_layer_types"]
