"""Curriculum (MiniMax-M1 §4.3): a weighted mixture of environments whose weights follow a schedule.

Config section (``config.curriculum``; all steps count RL steps, 0 = the first one)::

    curriculum = dict(
        envs=dict(sort=dict(env="sort", args=dict(difficulty=1)),      # name -> registered env + kwargs
                  boolean=dict(env="boolean", args=dict(difficulty=1))),
        schedule=dict(steps=(0, 4), weights=dict(sort=(1.0, 0.5), boolean=(0.0, 0.5)),
                      interpolation="linear"),   # "linear" between the steps, or "step" (piecewise constant)
        tokenizer="chars:...", max_prompt_tokens=64, max_new_tokens=32, eval_size_per_env=8, eval_seed=777,
    )

The mixture is a grain ``IterDataset`` (``ScheduledMix``): each draw picks an environment with the
weights of the current step (``iterator.set_step``) from a generator keyed on (seed, draw index),
then takes that environment's next example; its state (draw index, step, every environment's
stream position) is what train.py checkpoints, so a resumed run draws the same examples.

The RL problems' ``answer`` is JSON ``{"env": name, "reference": ...}``; ``Curriculum.reward`` (the
reward-registry signature) routes each completion to its environment's verifier. Held-out problems
add ``"strict": true``: they score correctness only (no format bonus), so train.py's pass@1 (reward
> 0) counts verified answers. SFT warm-start problems (``Task.stream``) carry the environments'
known-correct solutions instead.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import grain
import numpy as np

from m1jax import tokenizer as tokenizers
from m1jax.data.problem import Problem, prompt_ids
from m1jax.data.tasks import Task
from m1jax.envs.base import Environment, make_env
from m1jax.envs.genrm import LengthBiasMonitor

_KEYS = {"envs", "schedule", "tokenizer", "max_prompt_tokens", "max_new_tokens", "eval_size_per_env", "eval_seed"}


class Schedule:
    """Mixture weights as a function of the RL step: given at ``steps``, interpolated between them
    ("linear") or held until the next one ("step"), constant after the last."""

    def __init__(self, names, steps, weights: Mapping[str, Any], interpolation: str = "linear"):
        self.names, self.steps = list(names), np.asarray(steps, np.float64)
        if set(weights) != set(self.names):
            raise ValueError(f"curriculum.schedule.weights names {sorted(weights)} must be exactly the "
                             f"environments {sorted(self.names)}.")
        self.table = np.asarray([weights[n] for n in self.names], np.float64).T  # [len(steps), envs]
        if self.table.shape[0] != len(self.steps) or len(self.steps) == 0 or np.any(np.diff(self.steps) <= 0):
            raise ValueError("curriculum.schedule.steps must be increasing and every environment's weights must "
                             f"have one value per step ({len(self.steps)}).")
        if np.any(self.table < 0) or np.any(self.table.sum(1) <= 0):
            raise ValueError("curriculum.schedule.weights must be >= 0 with a positive sum at every step.")
        if interpolation not in ("linear", "step"):
            raise ValueError(f"curriculum.schedule.interpolation={interpolation!r}: use 'linear' or 'step'.")
        self.interpolation = interpolation

    def __call__(self, step: int) -> np.ndarray:
        if self.interpolation == "linear":
            w = np.asarray([np.interp(step, self.steps, col) for col in self.table.T])
        else:
            w = self.table[max(int(np.searchsorted(self.steps, step, side="right")) - 1, 0)]
        return w / w.sum()


class ScheduledMix(grain.IterDataset):
    """Mix the ``parents`` (one IterDataset per environment) with ``schedule(step)`` weights."""

    def __init__(self, parents, schedule: Schedule, seed: int):
        super().__init__(list(parents))
        self.schedule, self.seed = schedule, seed

    def __iter__(self):
        return _ScheduledMixIterator([iter(p) for p in self.parents], self.schedule, self.seed)

    def __str__(self):
        return f"ScheduledMix({len(self.parents)} environments)"


class _ScheduledMixIterator(grain.DatasetIterator):
    def __init__(self, parents, schedule: Schedule, seed: int):
        super().__init__(parents)
        self.schedule, self.seed, self.index, self.step = schedule, seed, 0, 0

    def set_step(self, step: int):
        """The training step whose weights the next draws use."""
        self.step = int(step)

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        k = int(rng.choice(len(self._parents), p=self.schedule(self.step)))
        self.index += 1
        return next(self._parents[k])

    def get_state(self):
        return {"index": self.index, "step": self.step, "parents": [p.get_state() for p in self._parents]}

    def set_state(self, state):
        self.index, self.step = state["index"], state["step"]
        for p, s in zip(self._parents, state["parents"]):
            p.set_state(s)


class Curriculum(Task):
    """The environments, their schedule and the tokenizer: a ``Task`` whose RL problems follow the
    schedule and whose samples are scored by each environment's verifier."""

    def __init__(self, cfg: Mapping[str, Any]):
        cfg = dict(cfg)
        missing, unknown = sorted(_KEYS - set(cfg)), sorted(set(cfg) - _KEYS)
        if missing or unknown:
            raise ValueError(f"curriculum: missing keys {missing}, unknown keys {unknown}; it takes {sorted(_KEYS)}.")
        self.envs: dict[str, Environment] = {}
        for name, spec in dict(cfg["envs"]).items():
            spec = dict(spec)
            if set(spec) - {"env", "args"} or "env" not in spec:
                raise ValueError(f"curriculum.envs.{name}: give env=<registered name> and optionally args=dict(...).")
            self.envs[name] = make_env(spec["env"], **dict(spec.get("args") or {}))
        if not self.envs:
            raise ValueError("curriculum.envs is empty: name at least one environment.")
        sched = dict(cfg["schedule"])
        self.schedule = Schedule(self.envs, sched["steps"], dict(sched["weights"]), sched.get("interpolation", "linear"))
        self.names = list(self.envs)
        self.eval_size_per_env, self.eval_seed = int(cfg["eval_size_per_env"]), int(cfg["eval_seed"])
        self.length_bias = LengthBiasMonitor()
        tok = tokenizers.load(cfg["tokenizer"])
        self.tokenizer, self.max_prompt_len = tok, int(cfg["max_prompt_tokens"])  # _eval_set needs them now
        super().__init__(tok, self.sft_stream, self._eval_set(), self.max_prompt_len, int(cfg["max_new_tokens"]),
                         reward=self.reward)

    # ------------------------------------------------------------------ problems
    def _problem(self, name: str, index: int, seed: int, target: str) -> Problem:
        ex = self.envs[name].example(seed, index)
        try:
            ids = prompt_ids(self.tokenizer, ex.prompt)
        except ValueError as e:
            raise ValueError(f"environment {name!r}: {e} Pick a curriculum.tokenizer that covers its prompts.") from e
        if len(ids) > self.max_prompt_len:
            raise ValueError(f"environment {name!r}: a prompt of {len(ids)} tokens exceeds "
                             f"curriculum.max_prompt_tokens={self.max_prompt_len}; raise it. ({ex.prompt[:80]!r})")
        if target == "solution":
            if ex.solution is None:
                raise ValueError(f"environment {name!r} has no known solutions, so it cannot be used for SFT: "
                                 "set sft.steps=0 or give it a weight of 0 at step 0.")
            return Problem(ids, ex.solution)
        return Problem(ids, json.dumps({"env": name, "reference": ex.reference, "strict": target == "eval"}))

    def _stream(self, name: str, seed: int, target: str) -> grain.MapDataset:
        return grain.MapDataset.range(1 << 40).map(lambda i: self._problem(name, int(i), seed, target))

    def sft_stream(self, seed: int) -> grain.MapDataset:
        """SFT problems (answer = a known-correct solution), mixed with the weights of RL step 0."""
        w = self.schedule(0)
        used = [(n, float(x)) for n, x in zip(self.names, w) if x > 0]
        seed_of = {n: seed * 1000 + i for i, n in enumerate(self.names)}
        return grain.MapDataset.mix([self._stream(n, seed_of[n], "solution") for n, _ in used], [x for _, x in used])

    def rl_iterator(self, seed: int):
        """The RL problems' iterator (``set_step``, ``get_state``/``set_state``)."""
        streams = [self._stream(n, seed * 1000 + i, "reference").to_iter_dataset() for i, n in enumerate(self.names)]
        return iter(ScheduledMix(streams, self.schedule, seed))

    def begin_step(self, iterator, rl_step: int) -> None:
        iterator.set_step(rl_step)  # this step's mixture weights

    def _eval_set(self) -> list[Problem]:
        """``eval_size_per_env`` held-out problems of every environment (their own seed; strict)."""
        return [self._problem(n, i, self.eval_seed * 1000 + k, "eval")
                for k, n in enumerate(self.names) for i in range(self.eval_size_per_env)]

    # ------------------------------------------------------------------ rewards and metrics
    def reward(self, prompt: str, completion: str, reference: str) -> float:
        """The reward-registry signature; ``reference`` is a curriculum problem's JSON answer."""
        ref = json.loads(reference)
        score = self.envs[ref["env"]].score(completion, ref["reference"])
        return score.correct if ref["strict"] else score.reward

    def score_all(self, prompts, completions, references, timeout_s: float = 5.0):
        """``rewards.score_all`` over a curriculum's samples: rule-based rows one call each (with the
        timeout), and the rows of each environment that judges in batches (``score_batch``, e.g.
        genrm) in one call. A batch that raises scores its rows 0, counted as errors."""
        from m1jax.data import rewards

        refs = [json.loads(r) for r in references]
        batched = {n for n, e in self.envs.items() if hasattr(e, "score_batch")}
        single = [i for i, r in enumerate(refs) if r["env"] not in batched]
        sub = rewards.score_all(self.reward, [prompts[i] for i in single], [completions[i] for i in single],
                                [references[i] for i in single], timeout_s)
        scores = [0.0] * len(refs)
        for i, x in zip(single, sub.scores):
            scores[i] = x
        for name in sorted(batched):
            rows = [i for i, r in enumerate(refs) if r["env"] == name]
            if not rows:
                continue
            try:
                got = self.envs[name].score_batch([completions[i] for i in rows], [refs[i]["reference"] for i in rows])
            except Exception as e:  # noqa: BLE001 -- a failing judge must not stop training
                sub.errors += len(rows)
                sub.messages.append(f"environment {name!r}: {type(e).__name__}: {e}")
                continue
            for i, s in zip(rows, got):
                scores[i] = s.correct if refs[i]["strict"] else s.reward
        sub.scores = scores
        return sub

    def weights(self, step: int) -> dict[str, float]:
        return {f"curriculum/weight/{n}": float(w) for n, w in zip(self.names, self.schedule(step))}

    def step_metrics(self, rl_step: int, problems, scores, lengths) -> dict[str, float]:
        """The step's mixture weights, per-environment metrics and the reward/length bias monitor
        (flags reward growing with length while "solved" does not)."""
        scores = np.asarray(scores)
        return {**self.weights(rl_step), **self.metrics(problems, scores, lengths),
                **self.length_bias.update(scores, lengths, scores >= 1)}

    def metrics(self, problems, rewards, lengths) -> dict[str, float]:
        """Per-environment ``count``, ``reward_mean``, ``solved`` (reward >= 1: the verifier said
        correct; the format bonus is < 1) and ``response_len_mean`` over a step's samples.
        problems [P]; rewards [P, G]; lengths [P * G]."""
        rewards = np.asarray(rewards, np.float64)
        lengths = np.asarray(lengths, np.float64).reshape(rewards.shape)
        env = np.asarray([json.loads(p.answer)["env"] for p in problems])
        out = {}
        for n in self.names:
            rows = env == n
            out[f"env/{n}/count"] = int(rows.sum() * rewards.shape[1])
            if rows.any():
                out[f"env/{n}/reward_mean"] = float(rewards[rows].mean())
                out[f"env/{n}/solved"] = float((rewards[rows] >= 1).mean())
                out[f"env/{n}/response_len_mean"] = float(lengths[rows].mean())
        return out
