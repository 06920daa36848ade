"""The default job's task: procedurally generated addition with an exact verifier (no downloads).

Character-level: "123+045=" -> "0168<eos>" (operands zero-padded to ``digits``, the sum to
digits + 1). Token ids: 0 pad, 1 bos, 2 eos, 3-12 the digits, 13 '+', 14 '='.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+="
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


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt_ids: list[int]
    answer: str


def make_problem(index: int, seed: int, digits: int) -> Problem:
    rng = np.random.default_rng([seed, index])
    a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
    prompt = f"{a:0{digits}d}+{b:0{digits}d}="
    return Problem([BOS] + encode(prompt), f"{a + b:0{digits + 1}d}")


def completion_text(completion_ids) -> str:
    """The completion as text; one that never emitted eos gets a trailing "…" (so it cannot match)."""
    ids = [int(t) for t in completion_ids]
    return decode(ids) + ("" if EOS in ids else "…")


def reward(completion_ids, answer: str) -> float:
    """1.0 for exactly the answer followed by eos, else 0.0 (the same test as the RL reward,
    ``exact_match`` on ``completion_text``)."""
    return 1.0 if completion_text(completion_ids) == answer else 0.0


def problems(seed: int, digits: int) -> grain.MapDataset:
    """An endless, shuffled-by-construction stream of problems (index -> problem), checkpointable."""
    return grain.MapDataset.range(1 << 40).map(lambda i: make_problem(int(i), seed, digits))


def eval_set(n: int, digits: int, seed: int = 12345) -> list[Problem]:
    """The fixed held-out set (its own seed, disjoint stream from training)."""
    return [make_problem(i, seed, digits) for i in range(n)]


def sft_batch(probs: list[Problem]):
    """Teacher-forcing sequences bos prompt answer eos, with a loss mask on the answer + eos."""
    seqs = [p.prompt_ids + encode(p.answer) + [EOS] for p in probs]
    ids = np.asarray(seqs, np.int32)
    mask = np.zeros_like(ids)
    plen = len(probs[0].prompt_ids)
    mask[:, plen:] = 1
    return ids, mask
