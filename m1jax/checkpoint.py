"""The run directory that train.py writes and m1jax.runs reads (local or gs://).

    workdir/config.json          the run's full config, written once everything is checked
    workdir/checkpoints/<step>/  orbax checkpoints, items:
                                   model, sft_opt, rl_opt  nnx.to_pure_dict(nnx.state(...))
                                   meta                    JSON: data iterator states, the RL key, the
                                                           SFT end step and pass@1, length schedule
    workdir/metrics.jsonl        one line per logged step (and tb/: the same as TensorBoard events)
    workdir/eval.json            held-out pass@1 after SFT and after RL
    workdir/reward_curve.png

A checkpoint holds everything a resumed run needs to continue bit for bit: running the same command
again restores the latest one.
"""

from __future__ import annotations

import orbax.checkpoint as ocp
from flax import nnx

from m1jax import storage

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

    def restore(self, **objects) -> tuple[int, dict] | None:
        """(step, meta) of the latest checkpoint, its states written into ``objects``; None if the run
        has no checkpoint yet."""
        step = self.mgr.latest_step()
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
