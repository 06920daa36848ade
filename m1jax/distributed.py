"""Multi-process (multi-host) JAX: one process per host, all processes in one mesh.

``maybe_initialize()`` calls ``jax.distributed.initialize`` when the launcher says so:
  * explicit: M1JAX_COORDINATOR=host:port, M1JAX_NUM_PROCESSES=N, M1JAX_PROCESS_ID=i
    (or train.py's and rollout.py's flags --coordinator, --num_processes, --process_id);
  * cluster auto-detection (TPU pods, SLURM, Open MPI): M1JAX_DISTRIBUTED=auto.
Single-process runs need nothing. Must run before any other JAX call.

Every process runs the same program on the same (host) data; ``fetch`` brings a result back to each
of them, and only the primary process writes a run's logs.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    coordinator = coordinator or os.environ.get("M1JAX_COORDINATOR")
    if num_processes is None and "M1JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["M1JAX_NUM_PROCESSES"])
    if process_id is None and "M1JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["M1JAX_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too "
                             "(M1JAX_NUM_PROCESSES / M1JAX_PROCESS_ID or the flags).")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    elif os.environ.get("M1JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return False
    _orbax_barriers_without_collectives()
    return True


def _orbax_barriers_without_collectives():
    """orbax's barrier between processes is by default a collective (a psum over every device), which
    its async checkpoint thread runs while the training thread runs its own collectives: the two can
    reach the processes in different orders, and the collectives then wait on each other for ever
    (seen as a rare hang of a 2-process train.py). The jax.distributed client's barrier has no
    collective, and a timeout."""
    import sys

    import orbax.checkpoint  # noqa: F401 -- defines the flag
    from absl import flags

    name = "experimental_orbax_use_distributed_barrier"
    if name not in flags.FLAGS:  # an orbax without the choice
        return
    if not flags.FLAGS.is_parsed():  # a notebook or library caller: no command line of our own to parse
        flags.FLAGS(sys.argv[:1], known_only=True)
    flags.FLAGS[name].value = True


def define_flags():
    """A script's --coordinator, --num_processes, --process_id (absl flags; the M1JAX_* variables
    stand in for any left unset): ``maybe_initialize(*(f.value for f in define_flags()))``."""
    from absl import flags

    return (flags.DEFINE_string("coordinator", None, "host:port of process 0, for a multi-process run"),
            flags.DEFINE_integer("num_processes", None, "processes in a multi-process run"),
            flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run"))


def from_primary(x: np.ndarray) -> np.ndarray:
    """Process 0's value of ``x`` on every process (what one host read, e.g. from a local file)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics and reports (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def fetch(tree):
    """``jax.device_get`` for multi-process runs too: an array sharded over other processes' devices
    is gathered, so every process gets the whole value (a collective: all processes call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)
