r"""Math: answers in ``\boxed{}`` checked by math-verify (symbolic equivalence, not string match).

The prompt source is either a JSONL file of ``{"prompt": ..., "answer": ...}`` lines (your data set,
read once; ``answer`` is LaTeX without ``\boxed``), or, with no file, generated exact-answer problems
(fraction sums, linear equations, quadratic roots) whose size grows with ``difficulty``.
"""

from __future__ import annotations

import logging
from fractions import Fraction

from m1jax import storage
from m1jax.envs.base import Environment, Example, extract_boxed, register_env

# math-verify's signal-based timeouts only work in the main thread and rewards are scored in worker
# threads: we call it with timeouts off (score_all bounds the call instead) and silence its warning
# that timeouts are off, which it would log on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)

INSTRUCTION = r"Put the final answer in \boxed{}."


def _latex(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return rf"{sign}\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def generate(rng, difficulty: int) -> tuple[str, str]:
    """A problem and its exact answer (LaTeX). difficulty >= 1 scales the numbers."""
    hi = 10 ** difficulty
    kind = int(rng.integers(3))
    if kind == 0:
        a, b = (Fraction(int(rng.integers(1, hi)), int(rng.integers(2, 10 + hi // 10))) for _ in range(2))
        return rf"Compute ${_latex(a)} + {_latex(b)}$.", _latex(a + b)
    if kind == 1:
        a, x, b = int(rng.integers(2, 10)), int(rng.integers(-hi, hi)), int(rng.integers(-hi, hi))
        return f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}$.", str(x)
    r1, r2 = sorted(int(v) for v in rng.integers(-hi, hi, size=2))
    s, p = r1 + r2, r1 * r2
    return (f"What is the larger root of $x^2 {'-' if s >= 0 else '+'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)} = 0$?",
            str(r2))


def equivalent(answer: str, reference: str) -> bool:
    """math-verify: is the LaTeX ``answer`` mathematically equal to ``reference``?"""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise ImportError("the math environment needs math-verify: pip install 'm1jax[math]'") from e
    gold = parse(rf"\boxed{{{reference}}}", parsing_timeout=None)
    pred = parse(rf"\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)


class MathEnv(Environment):
    format_weight = 0.1

    def __init__(self, path: str | None = None, difficulty: int = 1):
        if difficulty < 1:
            raise ValueError(f"math difficulty={difficulty}: must be >= 1.")
        self.difficulty = difficulty
        self.rows = None
        if path is not None:
            self.rows = storage.read_jsonl(path, "math data")
            bad = [i for i, r in enumerate(self.rows) if not {"prompt", "answer"} <= set(r)]
            if bad or not self.rows:
                raise ValueError(f"{path}: every line needs 'prompt' and 'answer' (bad lines {bad[:5]}), and "
                                 "the file must not be empty.")

    def make_example(self, rng):
        if self.rows is not None:
            row = self.rows[int(rng.integers(len(self.rows)))]
            prompt, answer = row["prompt"], str(row["answer"])
        else:
            prompt, answer = generate(rng, self.difficulty)
        return Example(f"{prompt} {INSTRUCTION}", answer, solution=rf"\boxed{{{answer}}}")

    def verify(self, completion, reference):
        answer = extract_boxed(completion)  # the last \boxed{}; the format reward wants exactly one
        return 1.0 if answer is not None and equivalent(answer, reference) else 0.0


register_env("math")(MathEnv)
