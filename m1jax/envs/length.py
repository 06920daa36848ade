"""Staged length extension (MiniMax-M1 §5): the generation window grows through configured stages.

Config section (``config.length``)::

    length = dict(windows=(16, 32), advance_at=(None,),    # step to force each advance, or None
                  p99_frac=0.9, ppl_window=4, ppl_tol=0.02,
                  max_grad_norm=(1.0, 0.5), is_weight_max=(5.0, 3.0))  # optional: per window

The paper's windows are 40K -> 48K -> 56K -> 64K -> 72K -> 80K; it moves on "when generation
perplexity converges and the 99th percentile of output lengths approaches the window". Here, after
each RL step, the window advances when

* ``p99 >= p99_frac * window`` (the p99 response length nears the window), and
* generation perplexity has converged: over the last ``ppl_window`` steps, the relative spread
  (max - min) / mean of exp(mean sampled-token NLL) is below ``ppl_tol``;

or unconditionally at step ``advance_at[i]`` (for advance i, if given). Both signals are returned
for logging every step, with the window this step used and, on the step that advances it, whether
the advance was forced by the configured step (``length/advance_forced``).

Each window is its stage's generation limit; the optional per-window ``max_grad_norm`` (a gradient
clip applied before the optimizer's, so at most rl_optim.max_grad_norm) and ``is_weight_max`` (CISPO's
IS-weight cap) are the paper's fixes for late-stage pattern collapse (lower both as responses grow).
The learner applies the stage of each step's samples and logs the values as length/<key>.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_KEYS = {"windows", "advance_at", "p99_frac", "ppl_window", "ppl_tol"}
STAGE_KEYS = ("max_grad_norm", "is_weight_max")  # optional, one value per window


class LengthSchedule:
    def __init__(self, cfg: Mapping[str, Any], max_new_tokens: int):
        cfg = dict(cfg)
        missing, unknown = sorted(_KEYS - set(cfg)), sorted(set(cfg) - _KEYS - set(STAGE_KEYS))
        if missing or unknown:
            raise ValueError(f"length: missing keys {missing}, unknown keys {unknown}; it takes {sorted(_KEYS)} "
                             f"and optionally {list(STAGE_KEYS)}.")
        self.windows = [int(w) for w in cfg["windows"]]
        self.advance_at = [None if s is None else int(s) for s in cfg["advance_at"]]
        if not self.windows or any(b <= a for a, b in zip(self.windows, self.windows[1:])) or self.windows[0] < 1:
            raise ValueError(f"length.windows={self.windows} must be positive and increasing.")
        if self.windows[-1] > max_new_tokens:
            raise ValueError(f"length.windows ends at {self.windows[-1]} > the task's max_new_tokens={max_new_tokens} "
                             "(the trainer's row width): raise max_new_tokens or lower the last window.")
        if len(self.advance_at) != len(self.windows) - 1:
            raise ValueError(f"length.advance_at needs one entry (a step or None) per advance: "
                             f"{len(self.windows) - 1} for windows {self.windows}.")
        self.p99_frac, self.ppl_window, self.ppl_tol = float(cfg["p99_frac"]), int(cfg["ppl_window"]), float(cfg["ppl_tol"])
        if not 0 < self.p99_frac <= 1 or self.ppl_window < 2 or self.ppl_tol <= 0:
            raise ValueError("length: p99_frac must be in (0, 1], ppl_window >= 2, ppl_tol > 0.")
        self.per_stage = {k: tuple(float(v) for v in cfg[k]) for k in STAGE_KEYS if cfg.get(k) is not None}
        for key, values in self.per_stage.items():
            if len(values) != len(self.windows) or min(values) <= 0:
                raise ValueError(f"length.{key}={values}: one value > 0 per window ({len(self.windows)} for "
                                 f"windows {self.windows}), or None for no per-stage value.")
        self.stage, self.ppl_history = 0, []

    @property
    def window(self) -> int:
        return self.windows[self.stage]

    def overrides(self) -> dict[str, float]:
        """This stage's settings (of STAGE_KEYS, those configured)."""
        return {key: values[self.stage] for key, values in self.per_stage.items()}

    def update(self, step: int, lengths, sampled_logprobs) -> dict[str, Any]:
        """After RL step ``step``: record this step's response lengths and the sampler log-probs of the
        sampled tokens, maybe advance. Returns the metrics of this step (the window it used)."""
        p99 = float(np.percentile(np.asarray(lengths), 99))
        ppl = float(np.exp(-np.mean(np.asarray(sampled_logprobs, np.float64))))
        self.ppl_history = (self.ppl_history + [ppl])[-self.ppl_window:]
        h = np.asarray(self.ppl_history)
        spread = float((h.max() - h.min()) / h.mean()) if len(h) == self.ppl_window else float("inf")
        near, converged = p99 >= self.p99_frac * self.window, spread < self.ppl_tol
        rec = {"length/window": self.window, "length/p99_frac_of_window": p99 / self.window, "length/gen_ppl": ppl,
               "length/gen_ppl_spread": spread, "length/p99_near": float(near), "length/ppl_converged": float(converged),
               "length/advanced": 0.0}
        if self.stage + 1 < len(self.windows):
            forced = self.advance_at[self.stage] is not None and step + 1 >= self.advance_at[self.stage]
            if forced or (near and converged):
                self.stage += 1
                self.ppl_history = []  # a new window: perplexity must settle again
                rec["length/advanced"] = 1.0
                rec["length/advance_forced"] = float(forced and not (near and converged))
        return rec

    def state(self) -> dict:
        return {"stage": self.stage, "ppl_history": list(self.ppl_history)}

    def restore(self, state: Mapping[str, Any]):
        self.stage, self.ppl_history = int(state["stage"]), list(state["ppl_history"])
