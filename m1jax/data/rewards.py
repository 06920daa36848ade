"""Reward functions: a registry, and scoring that survives a reward function that raises or hangs.

A reward function is ``fn(prompt: str, completion: str, reference: str) -> float``. Register your
own with ``@register("name")`` and select it by name in the config. ``score_all`` runs them with a
per-call timeout in a thread pool: an exception or a timeout scores 0.0 for that sample and is
reported (counted in the metrics); training goes on. (A hung call keeps its worker thread busy until
it returns; untrusted code belongs in the sandbox of the RL-environments issue, not here.)
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
from typing import Callable, Sequence

RewardFn = Callable[[str, str, str], float]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> RewardFn:
    if name not in REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REGISTRY)}. Add one with "
                       "@m1jax.data.rewards.register('name').")
    return REGISTRY[name]


@register("exact_match")
def exact_match(prompt: str, completion: str, reference: str) -> float:
    return 1.0 if completion.strip() == reference.strip() else 0.0


@register("math_verify")
def math_verify(prompt: str, completion: str, reference: str) -> float:
    """1.0 when math-verify finds the completion's answer (e.g. \\boxed{...}) equal to the reference."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the 'math_verify' reward needs the math-verify package: pip install math-verify") from e
    return 1.0 if verify(parse(reference), parse(completion)) else 0.0


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
