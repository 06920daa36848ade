"""Group-relative advantages, DAPO dynamic sampling and the soft overlong penalty."""

from __future__ import annotations

import numpy as np

NORMALIZATIONS = ("group", "batch", "none")


def group_advantages(rewards, std: str = "group", eps: float = 1e-6):
    """rewards [P, G] (G samples of each of P prompts) -> advantages [P, G].

    A = (R - mean over the group) / (std + eps), std the population std (ddof = 0) over the group
    ("group", GRPO), over the whole batch ("batch", ScaleRL), or no division ("none", Dr. GRPO).
    A group whose rewards are all equal gets A = 0.
    """
    r = np.asarray(rewards, np.float64)
    if std not in NORMALIZATIONS:
        raise ValueError(f"advantage std={std!r}: use one of {NORMALIZATIONS}.")
    centered = r - r.mean(axis=1, keepdims=True)
    if std == "group":
        return centered / (r.std(axis=1, keepdims=True) + eps)
    if std == "batch":
        return centered / (r.std() + eps)
    return centered


def groups_with_signal(rewards, tol: float = 1e-6):
    """DAPO dynamic sampling: True for prompt groups whose rewards are not all equal (max - min > tol;
    a tolerance, since float rewards of an all-equal group can differ in the last bits)."""
    r = np.asarray(rewards, np.float64)
    return (r.max(axis=1) - r.min(axis=1)) > tol


def overlong_penalty(lengths, max_len: int, cache_len: int):
    """DAPO soft overlong punishment, in tokens (paper Eq. 13): 0 up to max_len - cache_len, then a
    linear ramp to -1 at max_len, and -1 beyond."""
    n = np.asarray(lengths, np.float64)
    start = max_len - cache_len
    ramp = (start - n) / cache_len
    return np.where(n <= start, 0.0, np.where(n <= max_len, ramp, -1.0))
