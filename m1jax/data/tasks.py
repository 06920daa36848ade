"""Tasks for train.py, chosen by ``data.task`` in the config: where the prompts come from, how they
are tokenized, what is held out for evaluation, and the prompt/completion budgets.

* ``arith`` (the default job): generated additions with the arithmetic character tokenizer.
  Keys: digits, eval_size, eval_seed.
* ``jsonl``: one ``{"prompt": "...", "answer": "..."}`` object per line (answers may be numbers),
  scored by the config's reward function (e.g. ``math_verify``) against ``answer``. Keys: path,
  eval_path ("" = hold out the last eval_size lines of path), eval_size, tokenizer,
  max_prompt_tokens, max_new_tokens.

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
from m1jax.data import arith
from m1jax.data.problem import Problem, prompt_ids


@dataclasses.dataclass(frozen=True)
class Task:
    tokenizer: Any  # the m1jax.tokenizer.Tokenizer protocol
    stream: Callable[[int], grain.MapDataset]  # seed -> endless, checkpointable stream of Problems
    eval_set: list[Problem]
    max_prompt_len: int  # prompts are left-padded to this for sampling: one compiled shape
    max_new_tokens: int


def make_task(data: Mapping[str, Any]) -> Task:
    """The task of the config's ``data`` section; missing, unknown or invalid keys raise ValueError."""
    data = dict(data)
    name = data.pop("task", None)
    if name not in _BUILDERS:
        raise ValueError(f"data.task={name!r}: use one of {sorted(_BUILDERS)}.")
    required, build = _BUILDERS[name]
    missing, unknown = sorted(set(required) - set(data)), sorted(set(data) - set(required))
    if missing or unknown:
        raise ValueError(f"data (task {name!r}): missing keys {missing}, unknown keys {unknown}; "
                         f"the {name!r} task takes exactly {sorted(required)}.")
    return build(**data)


def _arith(digits: int, eval_size: int, eval_seed: int) -> Task:
    if digits < 1 or eval_size < 1:
        raise ValueError(f"data.digits={digits} and data.eval_size={eval_size} must be >= 1.")
    return Task(tokenizers.load("arith"), lambda seed: arith.problems(seed, digits),
                arith.eval_set(eval_size, digits, eval_seed), max_prompt_len=2 * digits + 3,
                max_new_tokens=digits + 2)  # bos a + b =  ->  digits + 1 sum digits, eos


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
}
