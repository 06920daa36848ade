"""Multi-process (multi-host) JAX: one process per host, all processes in one mesh.

``maybe_initialize()`` calls ``jax.distributed.initialize`` when the launcher says so:
  * explicit: M1JAX_COORDINATOR=host:port, M1JAX_NUM_PROCESSES=N, M1JAX_PROCESS_ID=i
    (or the same as train.py flags --coordinator, --num_processes, --process_id);
  * cluster auto-detection (TPU pods, SLURM, Open MPI): M1JAX_DISTRIBUTED=auto.
Single-process runs need nothing. Must run before any other JAX call.
"""

from __future__ import annotations

import os

import jax


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
        return True
    if os.environ.get("M1JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    return False
