"""Checkpoints: a train.py run directory (``runs``: the format, ``RunCheckpoints``, model restore
onto any mesh), transformers / original MiniMax checkpoint directories (``hf``: load and save), and
a run exported as a transformers directory (``export``, ``python -m m1jax.checkpoints.export``)."""

from m1jax.checkpoints.hf import CheckpointError
from m1jax.checkpoints.runs import RunCheckpoints, is_run_dir, load_model, restore_model, run_config, save_model

__all__ = ["CheckpointError", "RunCheckpoints", "is_run_dir", "load_model", "restore_model", "run_config",
           "save_model"]
