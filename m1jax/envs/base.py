r"""Environments: a prompt source + a verifier + a format check (MiniMax-M1 §4.1).

An ``Environment`` makes ``Example``s (prompt text, reference, optionally a known-correct
``solution``) from a seeded numpy generator and scores completions::

    reward = correct + format_weight * format

``correct`` in [0, 1] is the verifier's verdict, ``format`` is 1.0 when the completion puts its final
answer where the environment asks (e.g. one ``\boxed{...}``), so a well-formed wrong answer earns a
little and a malformed one nothing. ``Environment.reward`` has the signature of the reward registry
(``fn(prompt, completion, reference) -> float``), so ``m1jax.data.rewards.score_all`` can run it with
timeouts.

Add an environment in a few lines::

    from m1jax.envs import Example, FunctionEnv, extract_boxed, register_env

    @register_env("reverse")
    def reverse(length: int = 5):
        def make(rng):
            word = "".join(rng.choice(list("abcdef"), length))
            return Example(f"Reverse {word}. Answer in \\boxed{{}}.", word[::-1], solution=f"\\boxed{{{word[::-1]}}}")
        return FunctionEnv("reverse", make, lambda completion, ref: float(extract_boxed(completion) == ref))

and use it by name: ``make_env("reverse", length=7)`` or in a config's ``curriculum.envs``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # the text the policy sees
    reference: str  # what the verifier checks against: an answer, or JSON test cases
    solution: str | None = None  # a known-correct completion (SFT warm starts, tests); None if unknown
    env: str = ""  # the environment's name (set by Environment.examples)


@dataclasses.dataclass(frozen=True)
class Score:
    correct: float  # the verifier's verdict in [0, 1]
    format: float  # 1.0 when the answer is where the environment asks for it
    reward: float  # correct + format_weight * format


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), stripped; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def has_one_boxed(text: str) -> bool:
    """The default format check: exactly one complete ``\\boxed{...}``."""
    return text.count("\\boxed{") == 1 and extract_boxed(text) is not None


class Environment:
    """Subclass and implement ``make_example`` and ``verify``; override ``format_ok`` if the answer is
    not a single ``\\boxed{}``."""

    name: str = "env"
    format_weight: float = 0.1

    def make_example(self, rng: np.random.Generator) -> Example:
        raise NotImplementedError

    def verify(self, completion: str, reference: str) -> float:
        """Correctness in [0, 1] of ``completion`` against ``reference``."""
        raise NotImplementedError

    def format_ok(self, completion: str) -> bool:
        return has_one_boxed(completion)

    def score(self, completion: str, reference: str) -> Score:
        correct = float(self.verify(completion, reference))
        fmt = 1.0 if self.format_ok(completion) else 0.0
        return Score(correct, fmt, correct + self.format_weight * fmt)

    def reward(self, prompt: str, completion: str, reference: str) -> float:
        """The reward-registry signature (prompt unused by rule-based verifiers)."""
        del prompt
        return self.score(completion, reference).reward

    def example(self, seed: int, index: int) -> Example:
        ex = self.make_example(np.random.default_rng([seed, index]))
        return dataclasses.replace(ex, env=self.name)

    def examples(self, seed: int) -> grain.MapDataset:
        """An endless stream (index -> Example), a pure function of (seed, index): checkpointable."""
        return grain.MapDataset.range(1 << 40).map(lambda i: self.example(seed, int(i)))


class FunctionEnv(Environment):
    """An environment from two functions: ``make(rng) -> Example`` and ``verify(completion, reference)``."""

    def __init__(self, name: str, make: Callable[[np.random.Generator], Example],
                 verify: Callable[[str, str], float], format_ok: Callable[[str], bool] = has_one_boxed,
                 format_weight: float = 0.1):
        self.name, self._make, self._verify, self._format_ok = name, make, verify, format_ok
        self.format_weight = format_weight

    def make_example(self, rng):
        return self._make(rng)

    def verify(self, completion, reference):
        return self._verify(completion, reference)

    def format_ok(self, completion):
        return self._format_ok(completion)


REGISTRY: dict[str, Callable[..., Environment]] = {}


def register_env(name: str):
    """Register a factory ``(**kwargs) -> Environment`` under ``name``."""

    def deco(factory):
        if name in REGISTRY:
            raise ValueError(f"environment {name!r} is already registered; pick another name.")
        REGISTRY[name] = factory
        return factory

    return deco


def make_env(name: str, **kwargs) -> Environment:
    """Build a registered environment; unknown names and bad keyword arguments fail with the fix."""
    if name not in REGISTRY:
        raise KeyError(f"unknown environment {name!r}; registered: {sorted(REGISTRY)}. Add one with "
                       "@m1jax.envs.register_env('name').")
    try:
        env = REGISTRY[name](**kwargs)
    except TypeError as e:
        raise TypeError(f"environment {name!r}: bad arguments {kwargs}: {e}") from e
    env.name = name
    return env
