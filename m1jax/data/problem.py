"""A task's unit, a prompt with its reference answer, and the token-level helpers all tasks share.

Tokenizers follow the protocol of ``m1jax/tokenizer.py`` (``encode`` adds no special tokens,
``decode`` drops them; ``bos_id`` may be None, ``eos_id`` and ``pad_id`` are ids).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt_ids: list[int]  # bos (when the tokenizer has one) + the prompt's tokens
    answer: str  # the reference the reward function compares against


def prompt_ids(tokenizer, text: str) -> list[int]:
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)


def completion_text(tokenizer, completion_ids: Sequence[int]) -> str:
    """The completion as text, up to its eos; one that never emitted eos (cut at the length limit)
    gets a trailing "…", so that an exact-match reward cannot accept it."""
    ids = [int(t) for t in completion_ids]
    if tokenizer.eos_id in ids:
        return tokenizer.decode(ids[: ids.index(tokenizer.eos_id)])
    return tokenizer.decode(ids) + "…"


def sft_batch(problems: Sequence[Problem], tokenizer, width: int):
    """Teacher-forcing rows ``prompt answer eos``, right-padded to ``width``: ids [B, width] int32 and
    a loss mask [B, width] that is 1 on the answer and eos tokens."""
    ids = np.full((len(problems), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(problems), width), np.int32)
    for i, p in enumerate(problems):
        seq = p.prompt_ids + tokenizer.encode(p.answer) + [tokenizer.eos_id]
        if len(seq) > width:
            raise ValueError(f"SFT sequence of {len(seq)} tokens (prompt + answer {p.answer!r} + eos) is longer than "
                             f"{width} = max prompt + max new tokens; raise data.max_new_tokens or drop that problem.")
        ids[i, : len(seq)] = seq
        mask[i, len(p.prompt_ids): len(seq)] = 1
    return ids, mask
