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

``GenRMEnv`` (registered as ``genrm``) makes this a reward source of train.py: general tasks from a
JSONL file (``prompt``, ``reference``, optional ``solution``) whose completions a judge checkpoint (a
train.py run, local or gs://, or a MiniMax checkpoint directory) scores, all of a step's samples in
one batched call (``Curriculum.score_all``)::

    curriculum.envs.qa = dict(env="genrm", args=dict(data="qa.jsonl", judge="runs/judge", mode="grade"))

``LengthBiasMonitor`` watches for reward hacking by length (§4.2): per RL step it logs the
correlation between reward and response length and raises a flag when, over a window of steps,
reward and length grow together while task success does not.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np

from m1jax import storage
from m1jax.envs.base import Environment, Example, Score, extract_boxed, register_env

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
    """A judge backed by an m1jax model: greedy completions of the judge prompts (rollout engine).

    With ``prompt_width``, every call samples [batch_size, prompt_width] left-padded prompts (one
    compiled shape for a whole training run). A prompt longer than that, or with characters the
    judge's tokenizer cannot encode, gets the verdict "" (the scorers count it unreadable: grade 1,
    no preference) instead of failing the batch.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, batch_size: int = 16,
                 prompt_width: int | None = None):
        from m1jax.rollout import SamplingParams

        self.model, self.tokenizer, self.batch_size, self.prompt_width = model, tokenizer, batch_size, prompt_width
        self.params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,))
        self.rejected = 0  # prompts answered "" (longer than prompt_width, or not encodable)

    def __call__(self, prompts: list[str]) -> list[str]:
        import jax

        from m1jax.data.problem import completion_text, prompt_ids
        from m1jax.rollout import generate, left_pad

        def encode(p):  # characters the judge's tokenizer lacks (e.g. the "…" of a cut completion)
            try:
                return prompt_ids(self.tokenizer, p)
            except ValueError:
                return None

        ids = [encode(p) for p in prompts]
        fits = [x is not None and (self.prompt_width is None or len(x) <= self.prompt_width) for x in ids]
        self.rejected += fits.count(False)
        todo = [x for x, ok in zip(ids, fits) if ok]
        texts = []
        for i in range(0, len(todo), self.batch_size):
            rows = todo[i:i + self.batch_size]
            if self.prompt_width is None:
                r = jax.device_get(generate(self.model, rows, self.params))
            else:
                rows_ids, mask = left_pad(rows + [[self.tokenizer.pad_id]] * (self.batch_size - len(rows)),
                                          self.tokenizer.pad_id, width=self.prompt_width)
                r = jax.device_get(generate(self.model, rows_ids, self.params, prompt_mask=mask))
            texts += [completion_text(self.tokenizer, r.tokens[j, :r.lengths[j]]) for j in range(len(rows))]
        it = iter(texts)
        return [next(it) if ok else "" for ok in fits]


@register_env("genrm")
class GenRMEnv(Environment):
    """General tasks scored by a generative reward model (MiniMax-M1 §4.2).

    data: JSONL, one ``{"prompt": ..., "reference": ...}`` per line (``solution``, a known-good
    completion, is optional and only needed for SFT warm starts). judge: a train.py run directory
    (local or gs://) or a MiniMax checkpoint directory. mode: "grade" (reward = the mean of two 1-5
    grades mapped to [0, 1]) or "pairwise" (the {-1, 0, 1} preference over the reference mapped to
    {0, 0.5, 1}). judge_tokenizer: a tokenizer spec (default: the judge directory's tokenizer.json).
    There is no format bonus: the judge's verdict is the whole reward.
    """

    format_weight = 0.0

    def __init__(self, data: str, judge: str, mode: str = "grade", judge_tokenizer: str | None = None,
                 judge_max_new_tokens: int = 16, judge_max_prompt_tokens: int = 1024, judge_batch_size: int = 16):
        from m1jax.checkpoints import runs
        from m1jax import tokenizer as tokenizers

        if mode not in ("grade", "pairwise"):
            raise ValueError(f"genrm mode={mode!r}: use 'grade' or 'pairwise'.")
        self.rows = storage.read_jsonl(data, "genrm data")
        for n, row in enumerate(self.rows, 1):
            if not {"prompt", "reference"} <= set(row):
                raise ValueError(f"genrm data {data}: example {n} needs 'prompt' and 'reference' ({str(row)[:80]}).")
        if not self.rows:
            raise ValueError(f"genrm data={data!r} has no examples.")
        if judge_tokenizer is None:
            if storage.is_remote(judge) or not storage.exists(storage.join(judge, "tokenizer.json")):
                raise ValueError(f"genrm judge={judge!r} has no tokenizer.json: give judge_tokenizer=<spec>.")
            judge_tokenizer = storage.join(judge, "tokenizer.json")
        self.mode = mode
        self.judge = ModelJudge(runs.load_model(judge), tokenizers.load(judge_tokenizer), judge_max_new_tokens,
                                judge_batch_size, judge_max_prompt_tokens)

    def make_example(self, rng):
        row = self.rows[int(rng.integers(len(self.rows)))]
        # the reference carries the question: the judge needs both, verify() gets only the reference
        return Example(row["prompt"], json.dumps({"question": row["prompt"], "answer": row["reference"]}),
                       solution=row.get("solution"))

    def score_batch(self, completions: Sequence[str], references: Sequence[str]) -> list[Score]:
        """Judge all completions in one batched call (2 judge prompts each, positions swapped)."""
        refs = [json.loads(r) for r in references]
        args = ([r["question"] for r in refs], list(completions), [r["answer"] for r in refs])
        if self.mode == "grade":
            correct, _ = grade(self.judge, *args)
        else:
            prefs, _ = pairwise(self.judge, *args)
            correct = [(p + 1) / 2 for p in prefs]
        return [Score(float(c), 0.0, float(c)) for c in correct]

    def verify(self, completion: str, reference: str) -> float:
        return self.score_batch([completion], [reference])[0].correct

    def format_ok(self, completion: str) -> bool:
        return False


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
