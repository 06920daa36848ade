"""RL environments (prompt source + verifier + format reward), the code sandbox, a generative reward
model, the curriculum, staged generation length and data hygiene (MiniMax-M1 §4-§5).

Importing this package registers the built-in environments: math, logic (and its families sort,
boolean, countdown, knights), code, genrm (general tasks scored by a judge model).
"""

from m1jax.envs import code, genrm, logic, math  # noqa: F401 -- register the built-in environments
from m1jax.envs.base import (REGISTRY, Environment, Example, FunctionEnv, Score, extract_boxed, has_one_boxed,
                             make_env, register_env)

__all__ = ["REGISTRY", "Environment", "Example", "FunctionEnv", "Score", "extract_boxed", "has_one_boxed",
           "make_env", "register_env"]
