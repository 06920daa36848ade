"""The one task system train.py trains on: a ``Task`` is where the problems come from (SFT and RL),
how they are tokenized and scored, what is held out for evaluation, and the prompt/completion
budgets. ``from_config`` builds it from a training config:

* ``config.curriculum`` set: a weighted, scheduled mixture of registered environments
  (``m1jax.envs.curriculum.Curriculum``, a Task), each scored by its own verifier.
* otherwise ``data.task``:

  * ``arith`` (the default job): generated additions with the arithmetic character tokenizer,
    scored by ``rl.reward``. Keys: digits, eval_size, eval_seed.
  * ``jsonl``: one ``{"prompt": "...", "answer": "..."}`` object per line (answers may be numbers),
    scored by ``rl.reward`` (e.g. ``math_verify``) against ``answer``. Keys: path, eval_path
    ("" = hold out the last eval_size lines of path), eval_size, tokenizer, max_prompt_tokens,
    max_new_tokens.
  * ``env``: one registered environment (``m1jax.envs.make_env(env, **args)``), scored by its
    verifier: a curriculum of one. Keys: env, args, eval_size, eval_seed, tokenizer,
    max_prompt_tokens, max_new_tokens.

Rewards (``m1jax.data.rewards``) score the ``arith`` and ``jsonl`` tasks; environments
(``m1jax.envs``) bring their own problems and verifiers.

``data.tokenizer`` is handed to ``m1jax.tokenizer.load``, the one place tokenizers come from:
``chars:<alphabet>`` (one token per character, for toy models) or a Hugging Face
``tokenizer.json`` (or a directory holding one).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import grain

from m1jax import storage
from m1jax import tokenizer as tokenizers
from m1jax.data import arith, rewards
from m1jax.data.problem import Problem, prompt_ids


@dataclasses.dataclass
class Task:
    """Problems, their scoring and budgets. Subclasses (the curriculum) override the RL stream,
    the scoring and the per-step hooks; the defaults serve a fixed problem stream and one reward
    function."""

    tokenizer: Any  # the m1jax.tokenizer.Tokenizer protocol
    stream: Callable[[int], grain.MapDataset]  # seed -> endless, checkpointable stream of SFT Problems
    eval_set: list[Problem]
    max_prompt_len: int  # prompts are left-padded to this for sampling: one compiled shape
    max_new_tokens: int
    reward: rewards.RewardFn = rewards.exact_match  # fn(prompt, completion, answer) -> float

    def rl_iterator(self, seed: int):
        """The RL problems: an iterator with grain's ``get_state``/``set_state`` (checkpointed)."""
        return iter(self.stream(seed).to_iter_dataset())

    def begin_step(self, iterator, rl_step: int) -> None:
        """Called before each RL step's draws (a curriculum sets its mixture weights here)."""

    def score_all(self, prompts, completions, references, timeout_s: float = 5.0) -> rewards.ScoreReport:
        """Rewards of samples; a failing or hanging reward call scores 0 and is reported, never raised."""
        return rewards.score_all(self.reward, prompts, completions, references, timeout_s)

    def step_metrics(self, rl_step: int, problems, scores, lengths) -> dict[str, float]:
        """Task-specific metrics of an RL step: problems [P], scores [P, G], lengths [P * G]."""
        return {}


def from_config(config) -> Task:
    """The task of a training config: ``config.curriculum`` if set, else ``config.data`` scored by
    ``config.rl.reward``. Bad keys, files, tokenizers or reward names raise here, before anything
    compiles."""
    if config.get("curriculum") is not None:
        from m1jax.envs.curriculum import Curriculum

        return Curriculum(config.curriculum)
    return make_task(config.data, reward=config.get("rl", {}).get("reward", "exact_match"))


def make_task(data: Mapping[str, Any], reward: str = "exact_match") -> Task:
    """The task of a config's ``data`` section (``reward``: the registered or user reward function
    of the tasks that take one); missing, unknown or invalid keys raise ValueError."""
    data = dict(data)
    name = data.pop("task", None)
    if name not in _BUILDERS:
        raise ValueError(f"data.task={name!r}: use one of {sorted(_BUILDERS)}.")
    required, build = _BUILDERS[name]
    missing, unknown = sorted(set(required) - set(data)), sorted(set(data) - set(required))
    if missing or unknown:
        raise ValueError(f"data (task {name!r}): missing keys {missing}, unknown keys {unknown}; "
                         f"the {name!r} task takes exactly {sorted(required)}.")
    task = build(**data)
    if name in _SCORED_BY_REWARD:
        task.reward = rewards.get(reward)  # unknown names fail here
    return task


def _arith(digits: int, eval_size: int, eval_seed: int) -> Task:
    if digits < 1 or eval_size < 1:
        raise ValueError(f"data.digits={digits} and data.eval_size={eval_size} must be >= 1.")
    return Task(tokenizers.load("arith"), lambda seed: arith.problems(seed, digits),
                arith.eval_set(eval_size, digits, eval_seed), max_prompt_len=2 * digits + 3,
                max_new_tokens=digits + 2)  # bos a + b =  ->  digits + 1 sum digits, eos


def _env(env: str, args: Mapping[str, Any] | None, eval_size: int, eval_seed: int, tokenizer: str,
         max_prompt_tokens: int, max_new_tokens: int) -> Task:
    from m1jax.envs.curriculum import Curriculum

    return Curriculum(dict(envs={env: dict(env=env, args=dict(args or {}))},
                           schedule=dict(steps=(0,), weights={env: (1.0,)}), tokenizer=tokenizer,
                           max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                           eval_size_per_env=eval_size, eval_seed=eval_seed))


def _jsonl(path: str | None, eval_path: str, eval_size: int, tokenizer: str, max_prompt_tokens: int,
           max_new_tokens: int) -> Task:
    if not path:
        raise ValueError("data.path: set it to a JSONL file of {\"prompt\": ..., \"answer\": ...} lines "
                         "(--config.data.path=problems.jsonl).")
    if max_prompt_tokens < 1 or max_new_tokens < 1 or eval_size < 1:
        raise ValueError(f"data.max_prompt_tokens={max_prompt_tokens}, data.max_new_tokens={max_new_tokens} and "
                         f"data.eval_size={eval_size} must be >= 1.")
    tok = tokenizers.load(tokenizer)
    train = load_jsonl(path, tok, max_prompt_tokens)
    if eval_path:
        held_out = load_jsonl(eval_path, tok, max_prompt_tokens)[:eval_size]
    else:
        if len(train) <= eval_size:
            raise ValueError(f"{path}: {len(train)} problems, not enough to hold out data.eval_size={eval_size} "
                             "for evaluation and train on the rest; lower eval_size or set data.eval_path.")
        train, held_out = train[:-eval_size], train[-eval_size:]
    source = grain.MapDataset.source(train)
    return Task(tok, lambda seed: source.shuffle(seed=seed).repeat(), held_out,  # reshuffled every epoch
                max_prompt_len=max_prompt_tokens, max_new_tokens=max_new_tokens)


def load_jsonl(path: str, tokenizer, max_prompt_tokens: int) -> list[Problem]:
    """Problems of a JSONL file; a malformed line or a prompt that does not fit raises ValueError
    naming the file and line."""
    problems = []
    for n, line in storage.jsonl_lines(path, "data file"):
        where = f"{path} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e}).") from e
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str)
                and isinstance(rec.get("answer"), (str, int, float))):
            raise ValueError(f'{where}: expected {{"prompt": str, "answer": str or number}}, got {line.strip()[:200]}')
        try:
            ids = prompt_ids(tokenizer, rec["prompt"])
        except ValueError as e:
            raise ValueError(f"{where}: {e} Choose a data.tokenizer that covers the text.") from e
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"{where}: the prompt is {len(ids)} tokens, more than data.max_prompt_tokens="
                             f"{max_prompt_tokens}; raise it or shorten the prompt.")
        problems.append(Problem(ids, str(rec["answer"])))
    if not problems:
        raise ValueError(f"{path}: no problems (the file is empty).")
    return problems


_BUILDERS = {
    "arith": (("digits", "eval_size", "eval_seed"), _arith),
    "jsonl": (("path", "eval_path", "eval_size", "tokenizer", "max_prompt_tokens", "max_new_tokens"), _jsonl),
    "env": (("env", "args", "eval_size", "eval_seed", "tokenizer", "max_prompt_tokens", "max_new_tokens"), _env),
}
_SCORED_BY_REWARD = ("arith", "jsonl")
