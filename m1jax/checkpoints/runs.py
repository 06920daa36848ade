"""A train.py run directory (local or gs://): the format train.py writes, and reading its config and
model back.

    workdir/config.json          the run's full config, written once everything is checked
    workdir/checkpoints/<step>/  orbax checkpoints, items:
                                   model, sft_opt, rl_opt  nnx.to_pure_dict(nnx.state(...))
                                   meta                    JSON: data iterator states, the RL key, the
                                                           SFT end step and pass@1, length schedule
    workdir/metrics.jsonl        one line per logged step (and tb/: the same as TensorBoard events)
    workdir/eval.json            held-out pass@1 after SFT and after RL
    workdir/reward_curve.png

A checkpoint holds everything a resumed run needs to continue bit for bit (``RunCheckpoints``):
running the same command again restores the latest one. ``restore_model`` reads only the model item
(not the optimizer states) onto one device or onto any mesh: the checkpoint does not remember the
mesh it was saved from. ``save_model`` writes a model alone in the same layout (for notebooks and
scripts).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from m1jax import sharding as shd
from m1jax import storage
from m1jax.model import MiniMaxM1, ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


def _pure(obj):
    return nnx.to_pure_dict(nnx.state(obj))


class RunCheckpoints:
    """The checkpoints of a train.py run: ``save(step, meta, model=..., sft_opt=..., ...)`` and
    ``restore(model=..., ...)`` of the same nnx objects (in place) and a JSON ``meta``."""

    def __init__(self, workdir: str, keep: int):
        self.mgr = ocp.CheckpointManager(storage.join(workdir, CHECKPOINTS),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=keep))

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def restore(self, **objects) -> tuple[int, dict] | None:
        """(step, meta) of the latest checkpoint, its states written into ``objects``; None if the run
        has no checkpoint yet."""
        step = self.latest_step()
        if step is None:
            return None
        items = {name: ocp.args.StandardRestore(_pure(obj)) for name, obj in objects.items()}
        restored = self.mgr.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
        for name, obj in objects.items():
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(obj, state)
        return step, restored["meta"]

    def save(self, step: int, meta: dict, **objects) -> None:
        items = {name: ocp.args.StandardSave(_pure(obj)) for name, obj in objects.items()}
        self.mgr.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.close()


def latest_step(workdir: str) -> int | None:
    """The step of a run directory's latest checkpoint; None before its first."""
    if not is_run_dir(workdir):
        return None
    ckpts = RunCheckpoints(workdir, keep=1)
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def is_run_dir(path: str) -> bool:
    return storage.exists(storage.join(path, CHECKPOINTS))


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with."""
    storage.check_bucket(workdir)
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        raise storage.StorageError(f"{path} does not exist: {workdir} is not a train.py run directory "
                                   "(train.py --workdir=DIR writes DIR/config.json and DIR/checkpoints).")
    return ml_collections.ConfigDict(json.loads(storage.read_text(path)))


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """Read-only manager of ``workdir/checkpoints``; errors name a missing bucket or checkpoint."""
    storage.check_bucket(workdir)
    ckpt_dir = storage.join(workdir, CHECKPOINTS)
    mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    if mgr.latest_step() is None:
        raise storage.StorageError(f"no checkpoint in {ckpt_dir}: run train.py --workdir={workdir} first "
                                   "(checkpoints are written every config.checkpoint.every steps).")
    return mgr


def _restore_target(model: MiniMaxM1, mesh: Mesh | None):
    """The pure-dict restore target of ``model``'s state: abstract arrays with their shardings (the
    sharding rules on ``mesh``, or the first device)."""
    state = nnx.state(model)
    for _, var in nnx.to_flat_state(state):
        v = var.get_value()
        s = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else shd.param_sharding(var, mesh)
        var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
    return state


def restore_model(workdir: str, *, step: int | None = None, mesh: Mesh | None = None,
                  model_cfg: ModelConfig | None = None) -> tuple[MiniMaxM1, int]:
    """(model, step) from checkpoint ``step`` (default: the latest) of a train.py run.

    model_cfg defaults to the run's config.json ``model`` section. With ``mesh``, every parameter is
    read directly into its sharding under the rules of m1jax.sharding."""
    cfg = model_cfg or ModelConfig.from_dict(run_config(workdir).model.to_dict())
    if mesh is not None:
        shd.validate_model_for_mesh(cfg, mesh)
    mgr = checkpoint_manager(workdir)
    step = mgr.latest_step() if step is None else step
    if step not in mgr.all_steps():
        raise storage.StorageError(f"checkpoint step {step} not in {workdir}/{CHECKPOINTS}; "
                                   f"available: {mgr.all_steps()}.")
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(_restore_target(abstract, mesh))
    restored = mgr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))["model"]
    nnx.replace_by_pure_dict(state, restored)
    mgr.close()
    return nnx.merge(graphdef, state), step


def load_model(path: str, *, mesh: Mesh | None = None, **hf_overrides) -> MiniMaxM1:
    """The model at ``path``: the latest checkpoint of a train.py run (local or gs://), or a
    transformers/original MiniMax checkpoint directory (``m1jax.checkpoints.hf.load``); with ``mesh``, every
    parameter is placed in its sharding as it is read."""
    if storage.is_remote(path) or is_run_dir(path):
        return restore_model(path, mesh=mesh)[0]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither a train.py run directory nor a MiniMax checkpoint directory.")
    from m1jax.checkpoints import hf

    return hf.load(path, mesh=mesh, **hf_overrides)


def save_model(workdir: str, model: MiniMaxM1, step: int) -> None:
    """Write ``model`` as checkpoint ``step`` of ``workdir`` (local or gs://), replacing a checkpoint
    already at that step, and config.json (its ``model`` section) when the directory has none;
    ``restore_model`` reads it back."""
    workdir = storage.prepare_dir(workdir)
    config_path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(config_path):
        storage.write_text(config_path, json.dumps({"model": model.cfg.to_dict()}, indent=2))
    with ocp.CheckpointManager(storage.join(workdir, CHECKPOINTS)) as mgr:
        if step in mgr.all_steps():  # orbax would keep the old one and skip the save
            mgr.delete(step)
        mgr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model)))))
        mgr.wait_until_finished()
