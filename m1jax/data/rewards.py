"""Reward functions: a registry, and scoring that survives a reward function that raises or hangs.

A reward function is ``fn(prompt: str, completion: str, reference: str) -> float``. Select one in
the config (``rl.reward``) by its registered name (``@register("name")``), or name any function
as ``"package.module:function"`` (importable) or ``"path/to/file.py:function"``. ``score_all`` runs them with a
per-call timeout in a thread pool: an exception or a timeout scores 0.0 for that sample and is
reported (counted in the metrics); training goes on. (A hung call keeps its worker thread busy until
it returns; untrusted code belongs in the sandbox of the RL-environments issue, not here.)
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import importlib
import importlib.util
import logging
import os
from typing import Callable, Sequence

RewardFn = Callable[[str, str, str], float]
REGISTRY: dict[str, RewardFn] = {}
_REQUIRES: dict[str, tuple[str, str]] = {}  # name -> (module it imports, how to install it)


def register(name: str, requires: tuple[str, str] | None = None):
    """Register a reward under ``name``; ``requires=(module, install hint)`` names an optional
    package it imports, which ``get`` imports up front (a missing one fails at startup, and the first
    calls do not spend their timeout on the import)."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = fn
        if requires is not None:
            _REQUIRES[name] = requires
        return fn

    return deco


def get(name: str) -> RewardFn:
    """A registered reward, or a user function named ``"module:function"`` / ``"file.py:function"``."""
    if ":" in name:
        return _load_user_function(name)
    if name not in REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REGISTRY)}. Add one with "
                       "@m1jax.data.rewards.register('name'), or name a function as 'module:function' or "
                       "'path/to/file.py:function'.")
    if name in _REQUIRES:
        module, hint = _REQUIRES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ImportError(f"the {name!r} reward needs the {module!r} package: {hint}") from e
    return REGISTRY[name]


def _load_user_function(name: str) -> RewardFn:
    where, _, attr = name.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise FileNotFoundError(f"reward {name!r}: no file {where!r}.")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ImportError(f"reward {name!r}: cannot import {where!r} ({e}); install it, put it on PYTHONPATH, "
                              "or give the file as 'path/to/file.py:function'.") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {where!r} has no function {attr!r}.")
    return fn


@register("exact_match")
def exact_match(prompt: str, completion: str, reference: str) -> float:
    return 1.0 if completion.strip() == reference.strip() else 0.0


@register("math_verify", requires=("math_verify", "pip install 'm1jax[math]' (math-verify==0.9.0)"))
def math_verify(prompt: str, completion: str, reference: str) -> float:
    """1.0 when math-verify finds the completion's answer (e.g. \\boxed{...}, 14/2, 7.0) equal to the
    reference's, else 0.0."""
    from math_verify import parse, verify

    # math-verify's own timeouts use signal.alarm, which works only in the main thread; score_all
    # runs rewards in worker threads and bounds their time itself (so its "timeout is disabled"
    # warning does not apply).
    for module in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(module).setLevel(logging.ERROR)
    gold, answer = parse(reference, parsing_timeout=None), parse(completion, parsing_timeout=None)
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


@dataclasses.dataclass
class ScoreReport:
    scores: list[float]
    errors: int = 0
    timeouts: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)


_POOL = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="reward")


def score_all(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
              timeout_s: float = 5.0) -> ScoreReport:
    """Score every sample; a raising or hanging call scores 0.0 and is counted, never raised."""
    futures = [_POOL.submit(fn, p, c, r) for p, c, r in zip(prompts, completions, references)]
    report = ScoreReport(scores=[])
    for i, fut in enumerate(futures):
        try:
            report.scores.append(float(fut.result(timeout=timeout_s)))
        except cf.TimeoutError:
            report.scores.append(0.0)
            report.timeouts += 1
            report.messages.append(f"sample {i}: reward timed out after {timeout_s}s")
        except Exception as e:  # noqa: BLE001 -- any failure of user code scores 0
            report.scores.append(0.0)
            report.errors += 1
            report.messages.append(f"sample {i}: reward raised {type(e).__name__}: {e}")
    return report
