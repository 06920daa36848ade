from m1jax.model.config import FULL, LINEAR, ConfigError, ModelConfig, hybrid_layer_types
from m1jax.model.decoder import MiniMaxM1, ModelOutput, layer_index
from m1jax.model.moe import RouterStats, load_balancing_loss

__all__ = [
    "FULL",
    "LINEAR",
    "ConfigError",
    "ModelConfig",
    "hybrid_layer_types",
    "MiniMaxM1",
    "ModelOutput",
    "layer_index",
    "RouterStats",
    "load_balancing_loss",
]
