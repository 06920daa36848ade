r"""Generative reward model (MiniMax-M1 §4.2): a model judges a response against a reference answer.

* ``pairwise``: the judge compares the response with the reference and answers ``\boxed{A}``,
  ``\boxed{B}`` or ``\boxed{tie}``. It judges twice with the positions swapped; the score in
  {-1, 0, 1} is +1 (-1) only when both orders prefer the response (the reference), else 0, so a
  judge that merely prefers a position scores ties.
* ``grade``: for tasks with a ground truth, the judge grades the response 1-5 against the reference,
  twice (reference shown before, then after the response); the reward is the mean grade mapped to
  [0, 1] by (g - 1) / 4. An unreadable verdict counts as the lowest grade.

A judge is any ``fn(list of judge prompts) -> list of verdict texts``; ``ModelJudge`` is one backed
by an m1jax model sampled with the rollout engine (``m1jax.rollout.generate``).

``LengthBiasMonitor`` watches for reward hacking by length (§4.2): per RL step it logs the
correlation between reward and response length and raises a flag when, over a window of steps,
reward and length grow together while task success does not.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from m1jax.envs.base import extract_boxed

Judge = Callable[[list[str]], list[str]]

PAIRWISE = ("Question:\n{q}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nWhich response answers the question better? "
            "Reply with \\boxed{{A}}, \\boxed{{B}} or \\boxed{{tie}}.")
GRADE = ("Question:\n{q}\n\n{first_name}:\n{first}\n\n{second_name}:\n{second}\n\nGrade the response against the "
         "reference answer from 1 (wrong) to 5 (fully correct). Reply with \\boxed{{1}} ... \\boxed{{5}}.")


def _preference(verdict: str) -> int | None:
    """+1 for A, -1 for B, 0 for a tie, None if unreadable."""
    v = (extract_boxed(verdict) or "").strip().lower()
    return {"a": 1, "b": -1, "tie": 0}.get(v)


def pairwise(judge: Judge, questions: Sequence[str], responses: Sequence[str], references: Sequence[str]):
    """Scores in {-1, 0, 1} (response vs reference, position-swapped double judging) and the number
    of unreadable verdicts (each counted as no preference)."""
    n = len(questions)
    prompts = [PAIRWISE.format(q=q, a=r, b=ref) for q, r, ref in zip(questions, responses, references)]
    prompts += [PAIRWISE.format(q=q, a=ref, b=r) for q, r, ref in zip(questions, responses, references)]
    prefs = [_preference(v) for v in judge(prompts)]
    unreadable = sum(p is None for p in prefs)
    first = np.asarray([p or 0 for p in prefs[:n]])  # +1: the response (shown as A) wins
    second = -np.asarray([p or 0 for p in prefs[n:]])  # swapped: B is the response
    scores = np.where(first == second, first, 0)
    return scores.astype(int).tolist(), unreadable


def grade(judge: Judge, questions: Sequence[str], responses: Sequence[str], references: Sequence[str]):
    """Rewards in [0, 1] from two 1-5 grades (reference before / after the response), and the number
    of unreadable verdicts (each graded 1)."""
    n = len(questions)
    before = [GRADE.format(q=q, first_name="Reference answer", first=ref, second_name="Response", second=r)
              for q, r, ref in zip(questions, responses, references)]
    after = [GRADE.format(q=q, first_name="Response", first=r, second_name="Reference answer", second=ref)
             for q, r, ref in zip(questions, responses, references)]
    grades = []
    for v in judge(before + after):
        g = (extract_boxed(v) or "").strip()
        grades.append(int(g) if g in {"1", "2", "3", "4", "5"} else None)
    unreadable = sum(g is None for g in grades)
    g = np.asarray([x or 1 for x in grades], np.float64).reshape(2, n).mean(0)
    return ((g - 1) / 4).tolist(), unreadable


class ModelJudge:
    """A judge backed by an m1jax model: greedy completions of the judge prompts (rollout engine)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, batch_size: int = 16):
        from m1jax.rollout import SamplingParams

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,))

    def __call__(self, prompts: list[str]) -> list[str]:
        import jax

        from m1jax.data.problem import completion_text, prompt_ids
        from m1jax.rollout import generate

        out = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [prompt_ids(self.tokenizer, p) for p in prompts[i:i + self.batch_size]]
            r = jax.device_get(generate(self.model, ids, self.params))
            out += [completion_text(self.tokenizer, r.tokens[j, :r.lengths[j]]) for j in range(len(ids))]
        return out


class LengthBiasMonitor:
    """Per step: Pearson correlation of reward with response length. Flag (1.0) when over the last
    ``window`` steps the mean reward and mean length both trend up (positive least-squares slopes),
    their step means correlate above ``min_corr``, and the success rate's slope is <= ``success_tol``
    per step (success does not improve)."""

    def __init__(self, window: int = 20, min_corr: float = 0.5, success_tol: float = 0.0):
        if window < 3:
            raise ValueError(f"LengthBiasMonitor window={window}: needs >= 3 steps.")
        self.window, self.min_corr, self.success_tol = window, min_corr, success_tol
        self.history: list[tuple[float, float, float]] = []  # (mean reward, mean length, success rate)

    def update(self, rewards, lengths, success) -> dict[str, float]:
        r, n, s = (np.asarray(x, np.float64).reshape(-1) for x in (rewards, lengths, success))
        corr = float(np.corrcoef(r, n)[0, 1]) if r.std() > 0 and n.std() > 0 else 0.0
        self.history = (self.history + [(r.mean(), n.mean(), s.mean())])[-self.window:]
        flag = 0.0
        if len(self.history) == self.window:
            h = np.asarray(self.history)
            t = np.arange(self.window)
            slope = lambda y: float(np.polyfit(t, y, 1)[0])  # noqa: E731
            trend_corr = float(np.corrcoef(h[:, 0], h[:, 1])[0, 1]) if h[:, 0].std() > 0 and h[:, 1].std() > 0 else 0.0
            flag = float(slope(h[:, 0]) > 0 and slope(h[:, 1]) > 0 and trend_corr > self.min_corr
                         and slope(h[:, 2]) <= self.success_tol)
        return {"genrm/reward_length_corr": corr, "genrm/length_bias_flag": flag}
