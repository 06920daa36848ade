"""SFT warm start, then CISPO reinforcement learning, with metrics and resumable checkpoints.

    python train.py --config=configs/arith_cispo.py --workdir=runs/arith
    python train.py --config=configs/minimax_m1_rl.py ... --dry_run   # check a run, compile nothing

Writes workdir/metrics.jsonl (one line per step), workdir/eval.json (held-out pass@1 after SFT,
i.e. before RL, and after RL), workdir/reward_curve.png, and orbax checkpoints in
workdir/checkpoints (the format: m1jax/checkpoints/runs.py); running the same command again resumes from
the latest checkpoint. The training itself is m1jax/training.py's; this file is its command line.
"""

from __future__ import annotations

import sys

from absl import app, flags

from m1jax import cli, distributed

_DEFAULT_CONFIG = "configs/arith_cispo.py"
_CONFIG = cli.define_config("train.py", "config", _DEFAULT_CONFIG, "config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/arith", "output directory (checkpoints, metrics)")
_PROCESS_FLAGS = distributed.define_flags()  # multi-host: the same command on every host
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config (file + overrides) and exit")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "check the config, data, mesh and checkpoint, print the per-device "
                             "memory of the abstract model, and exit (nothing compiled or written)")


def main(argv):
    del argv
    if _PRINT_CONFIG.value:
        return cli.print_config(_CONFIG.value)
    distributed.maybe_initialize(*(f.value for f in _PROCESS_FLAGS))  # before any other JAX call
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from m1jax import training

    # Everything is checked before anything compiles or is written: a mistake is one line, exit code 2.
    with cli.user_errors("train.py"):
        setup = training.setup(_CONFIG.value, _WORKDIR.value)
    if _DRY_RUN.value:
        training.dry_run(setup)
        return 0
    training.train_and_evaluate(setup)


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=cli.flags_parser("train.py", "config", _DEFAULT_CONFIG)))
