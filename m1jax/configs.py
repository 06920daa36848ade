"""Loading ml_collections config files (configs/*.py) into typed m1jax configs."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from m1jax.model.config import ModelConfig


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Run ``get_config(arg)`` of a config file (as absl's config_flags does)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; see configs/ for the available ones.")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig from the ``model`` section of a config; unknown or invalid keys raise ConfigError."""
    return ModelConfig.from_dict(config.model.to_dict())
