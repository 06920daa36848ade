"""The default job's task: procedurally generated addition with an exact verifier (no downloads).

Character-level: "123+045=" -> "0168<eos>" (operands zero-padded to ``digits``, the sum to
digits + 1). Token ids: 0 pad, 1 bos, 2 eos, 3-12 the digits, 13 '+', 14 '=' (the same as
``m1jax.tokenizer.CharTokenizer(CHARS)``). The reward is ``exact_match`` on the completion text.
"""

from __future__ import annotations

import grain
import numpy as np

from m1jax.data.problem import Problem
from m1jax.tokenizer import ARITH_CHARS

PAD, BOS, EOS = 0, 1, 2
CHARS = ARITH_CHARS
VOCAB_SIZE = 3 + len(CHARS)


def encode(text: str) -> list[int]:
    return [3 + CHARS.index(c) for c in text]


def decode(ids) -> str:
    """Characters up to the first eos (pad/bos skipped)."""
    out = []
    for t in ids:
        t = int(t)
        if t == EOS:
            break
        if t >= 3:
            out.append(CHARS[t - 3])
    return "".join(out)


def make_problem(index: int, seed: int, digits: int) -> Problem:
    rng = np.random.default_rng([seed, index])
    a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    return Problem([BOS] + encode(prompt), f"{a + b:0{digits + 1}d}")


def problems(seed: int, digits: int) -> grain.MapDataset:
    """An endless, shuffled-by-construction stream of problems (index -> problem), checkpointable."""
    return grain.MapDataset.range(1 << 40).map(lambda i: make_problem(int(i), seed, digits))


def eval_set(n: int, digits: int, seed: int = 12345) -> list[Problem]:
    """The fixed held-out set (its own seed, disjoint stream from training)."""
    return [make_problem(i, seed, digits) for i in range(n)]
