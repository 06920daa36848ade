"""Planning a pod run on a CPU host: TPU ahead-of-time compiles of the real programs (``pod``,
``python -m m1jax.plan``), the topologies and abstract sharded programs they compile (``aot``), and
the analytic per-device memory estimate (``memory``, ``python -m m1jax.plan.memory``)."""

from m1jax.plan.pod import main

__all__ = ["main"]
