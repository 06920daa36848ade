"""Sampled completions -> the trainer's arrays (one row per sample, prompt then completion).

The rollout engine left-pads prompts (its RoPE positions count real tokens only); the trainer
right-pads instead, so that every row starts at position 0 in the plain causal forward. Target
index t of a row predicts token t + 1: the completion's targets are t = P_i - 1 ... P_i - 2 + L_i
for a prompt of P_i tokens and a completion of L_i tokens (its stop token included).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def pad_rows(x, n: int, fill=0) -> np.ndarray:
    """x [N, ...] with rows of ``fill`` appended up to n rows (x itself when N >= n)."""
    x = np.asarray(x)
    if len(x) >= n:
        return x
    return np.concatenate([x, np.full((n - len(x),) + x.shape[1:], fill, x.dtype)])


class RLBatch(NamedTuple):
    ids: np.ndarray  # [N, width] int32: prompt, completion, pad
    completion_mask: np.ndarray  # [N, width - 1] bool: targets that are completion tokens
    sampler_logp: np.ndarray  # [N, width - 1] float32: the sampler's log pi_T at those targets, 0 elsewhere


def rollout_batch(prompts: Sequence[Sequence[int]], tokens, logprobs, lengths, width: int, pad_id: int) -> RLBatch:
    """prompts: the N rows' prompt ids; tokens, logprobs [N, M] and lengths [N] from the rollout
    (``Rollout``); width >= longest prompt + M (fixed by the caller, so shapes do not vary)."""
    tokens, logprobs, lengths = np.asarray(tokens), np.asarray(logprobs), np.asarray(lengths)
    n, m = tokens.shape
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} sampled rows.")
    if max(len(p) for p in prompts) + m > width:
        raise ValueError(f"width={width} < longest prompt ({max(len(p) for p in prompts)}) + max_new_tokens ({m}).")
    ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width - 1), bool)
    old = np.zeros((n, width - 1), np.float32)
    for i, (p, length) in enumerate(zip(prompts, lengths)):
        plen = len(p)
        ids[i, :plen] = p
        ids[i, plen: plen + length] = tokens[i, :length]
        mask[i, plen - 1: plen - 1 + length] = True
        old[i, plen - 1: plen - 1 + length] = logprobs[i, :length]
    return RLBatch(ids, mask, old)


def routing_batch(prompts: Sequence[Sequence[int]], prompt_routing, routing, lengths, width: int) -> np.ndarray:
    """The sampler's recorded routing laid out like ``rollout_batch``'s rows, for routing replay:
    [N, width, num_layers, top_k] (uint8 expert ids; 0 at padding). prompt_routing: per row its
    prompt's routing [W, L, k] left-padded to W (a row of ``Rollout.prompt_routing``; the samples of a
    prompt may share one array); routing [N, M, L, k] the completion tokens'."""
    routing, lengths = np.asarray(routing), np.asarray(lengths)
    if routing.max(initial=0) > 255:
        raise ValueError("routing_batch stores expert ids as uint8: at most 256 experts.")
    out = np.zeros((len(prompts), width) + routing.shape[2:], np.uint8)
    for i, (p, length) in enumerate(zip(prompts, lengths)):
        plen = len(p)
        out[i, :plen] = np.asarray(prompt_routing[i])[-plen:]
        out[i, plen: plen + length] = routing[i, :length]
    return out
