"""The RL learner: ``collect()`` samples and scores a step's groups (DAPO dynamic sampling),
``update(batch)`` runs the CISPO (or DAPO / GRPO) minibatch updates on them.

``RLConfig`` is the ``rl`` section of a training config, checked when it is built. The learner owns
the policy's optimizer and the RL key; sampling and scoring come in as functions, so the same
learner runs on the slot engine or static batches, with any reward or environment mixture.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.model.config import ConfigError, dataclass_from_dict
from m1jax.rl.advantages import group_advantages, groups_with_signal, overlong_penalty
from m1jax.rl.batch import RLBatch, pad_rows, rollout_batch, routing_batch
from m1jax.rollout.engine import REPETITION
from m1jax.rl.cispo import PRESETS, LossConfig, token_weights
from m1jax.rl.steps import cispo_step, policy_stats


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 200
    prompts_per_step: int = 32  # groups trained on per step
    samples_per_prompt: int = 8  # G
    updates_per_rollout: int = 2  # passes over the step's groups (off-policy after the first)
    minibatches: int = 2  # optimizer updates per pass
    temperature: float = 1.0
    loss: str = "cispo"  # a preset of m1jax.rl.cispo.PRESETS
    is_weight_max: float | None = 5.0  # CISPO's eps_high^IS (1 + eps = the cap of the IS weight)
    aggregation: str = "token_mean"
    advantage_std: str = "group"
    dynamic_sampling: bool = True  # DAPO: keep only groups whose rewards differ
    max_gen_batches: int = 3  # generation batches per step at most, while too few groups have signal
    # Problems drawn per generation batch with dynamic sampling (DAPO's generation batch size; None:
    # prompts_per_step). Drawing more than prompts_per_step usually fills a step in one batch instead
    # of two; the groups with signal past prompts_per_step are dropped. Without dynamic sampling every
    # batch draws prompts_per_step problems (all are kept).
    gen_prompts: int | None = None
    reward: str = "exact_match"
    reward_timeout_s: float = 5.0
    # pi_old: the sampler's log-probs, or the trainer's forward before the updates (then tis_cap adds
    # the truncated sampler correction min(pi_old / pi_sampler, tis_cap) as a separate detached factor).
    old_logp: str = "sampler"
    tis_cap: float | None = None
    overlong_cache_len: int = 0  # > 0: DAPO soft overlong penalty over the last this many tokens
    # Early truncation of RL samples (paper §3.2): a sample ends after repetition_window consecutive
    # tokens each sampled with probability > repetition_prob (0: off). None: the config's
    # sampling.repetition_window / repetition_prob (the model config's; configs/minimax_m1.py: 3000 / 0.99).
    repetition_window: int | None = None
    repetition_prob: float | None = None
    # Routing replay (R3): the sampler records every token's experts and the trainer's MoE uses them
    # (the router only weights them), so an expert choice that flips between sampler and trainer
    # numerics does not change the policy being trained.
    routing_replay: bool = False

    def __post_init__(self):
        if self.loss not in PRESETS:
            raise ConfigError(f"rl.loss={self.loss!r}: use one of {sorted(PRESETS)}.")
        if self.old_logp not in ("sampler", "recomputed"):
            raise ConfigError(f"rl.old_logp={self.old_logp!r}: use 'sampler' or 'recomputed'.")
        if self.tis_cap is not None and self.old_logp != "recomputed":
            raise ConfigError("rl.tis_cap needs rl.old_logp='recomputed' (with sampler log-probs as pi_old the "
                              "sampler correction is already inside the CISPO ratio: it would count twice).")
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "updates_per_rollout", "minibatches",
                    "max_gen_batches", "gen_prompts"):
            value = getattr(self, key)
            if key == "gen_prompts" and value is None:  # None: prompts_per_step
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "steps" else 1):
                raise ConfigError(f"rl.{key}={value!r}: must be an integer >= {0 if key == 'steps' else 1}.")
        if self.prompts_per_step % self.minibatches:
            raise ConfigError(f"rl.minibatches={self.minibatches} must divide rl.prompts_per_step="
                              f"{self.prompts_per_step}.")
        if self.overlong_cache_len < 0:
            raise ConfigError(f"rl.overlong_cache_len={self.overlong_cache_len}: must be >= 0.")
        if self.repetition_window is not None and self.repetition_window < 0:
            raise ConfigError(f"rl.repetition_window={self.repetition_window}: must be >= 0 (0: no truncation).")
        if self.repetition_prob is not None and not 0 < self.repetition_prob < 1:
            raise ConfigError(f"rl.repetition_prob={self.repetition_prob}: must be in (0, 1).")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RLConfig":
        return dataclass_from_dict(cls, d, "rl")

    def loss_config(self) -> LossConfig:
        cfg = dataclasses.replace(PRESETS[self.loss], aggregation=self.aggregation)
        if self.loss == "cispo":
            cfg = dataclasses.replace(cfg, is_weight_max=self.is_weight_max)
        if self.tis_cap is not None:
            cfg = dataclasses.replace(cfg, tis_cap=self.tis_cap)
        return cfg


class NonFiniteGuard:
    """Non-finite updates are skipped (optax.apply_if_finite); stop the run after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def __call__(self, finite, step: int):
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite updates in a row at step {step} (loss or gradient NaN/inf); they were "
                "skipped. Lower the learning rate (sft_optim / rl_optim) or check the data.")


@dataclasses.dataclass
class Collected:
    """A step's rollouts: reward metrics of every sampled group, and the kept groups as a batch."""

    metrics: dict  # reward_mean, pass_rate, groups_kept, gen_batches, reward_failures
    problems: list  # every sampled problem (kept or not), for curriculum metrics
    rewards: np.ndarray  # [every sampled group, G]
    lengths: np.ndarray  # [every sampled row]
    batch: RLBatch | None  # the n kept groups' G rows each (None: no group to train on)
    advantages: np.ndarray | None  # [n * G]
    routing: np.ndarray | None = None  # [n * G, width, num_layers, top_k] with rl.routing_replay


class RLLearner:
    """``collect(window)`` then ``update(collected, step, rl_step)``; ``sample(problems, num_samples, key,
    max_new_tokens)`` -> a Rollout, ``score(problems, rollout, G)`` -> a rewards ScoreReport."""

    def __init__(self, model, optimizer, cfg: RLConfig, *, sample: Callable, score: Callable, problems: Iterator,
                 width: int, max_new_tokens: int, pad_id: int, key, windows=None,
                 guard: NonFiniteGuard | None = None, fetch: Callable = jax.device_get):
        self.model, self.optimizer, self.cfg, self.loss_cfg = model, optimizer, cfg, cfg.loss_config()
        self.sample, self.score, self.problems = sample, score, problems
        self.width, self.max_new_tokens, self.pad_id = width, max_new_tokens, pad_id
        self.key = key
        self.windows, self.guard, self.fetch = windows, guard or NonFiniteGuard(5), fetch

    def collect(self, window: int | None = None) -> Collected:
        """Generation batches of ``gen_prompts`` problems (``prompts_per_step`` if None or without
        dynamic sampling) x G samples until ``prompts_per_step`` groups have signal (all do with
        dynamic sampling off) or ``max_gen_batches`` ran; each sample at most ``window`` tokens (None:
        ``max_new_tokens``, the task's limit). The first ``prompts_per_step`` kept groups form the batch."""
        cfg, g = self.cfg, self.cfg.samples_per_prompt
        draw = (cfg.gen_prompts if cfg.dynamic_sampling else None) or cfg.prompts_per_step
        problems, lengths, all_rewards = [], [], []
        kept_prompts, kept_tokens, kept_logp, kept_len, kept_rewards, kept_routing = [], [], [], [], [], []
        n_gen = n_failures = n_repetition = 0
        while len(kept_rewards) < cfg.prompts_per_step and n_gen < cfg.max_gen_batches:
            probs = [next(self.problems) for _ in range(draw)]
            self.key, sub = jax.random.split(self.key)
            r = self.sample(probs, g, sub, window)
            problems += probs
            lengths.append(r.lengths)
            n_repetition += int(np.sum(np.asarray(r.finish_reason) == REPETITION))
            report = self.score(probs, r, g)
            n_failures += report.errors + report.timeouts
            scores = np.asarray(report.scores).reshape(len(probs), g)
            if cfg.overlong_cache_len > 0:  # DAPO soft overlong penalty, in tokens
                limit = window if window is not None else self.max_new_tokens
                scores = scores + overlong_penalty(np.asarray(r.lengths), limit,
                                                   cfg.overlong_cache_len).reshape(len(probs), g)
            all_rewards.append(scores)
            keep = groups_with_signal(scores) if cfg.dynamic_sampling else np.ones(len(probs), bool)
            if cfg.routing_replay and getattr(r, "routing", None) is None:
                raise ValueError("rl.routing_replay needs the sampler's routing: sample with record_routing=True.")
            for i in np.flatnonzero(keep):
                rows = slice(i * g, (i + 1) * g)
                kept_prompts += [probs[i].prompt_ids] * g
                kept_tokens.append(r.tokens[rows])
                kept_logp.append(r.logprobs[rows])
                kept_len.append(r.lengths[rows])
                kept_rewards.append(scores[i])
                if cfg.routing_replay:  # the prompt's routing (shared by its G rows) and its samples'
                    kept_routing.append(([np.asarray(r.prompt_routing[i])] * g, np.asarray(r.routing[rows])))
            n_gen += 1
        rewards = np.concatenate(all_rewards)
        metrics = {"reward_mean": rewards.mean(), "pass_rate": (rewards > 0).mean(), "groups_kept": len(kept_rewards),
                   "gen_batches": n_gen, "reward_failures": n_failures,
                   "repetition_frac": n_repetition / rewards.size}  # samples ended by early truncation
        n = min(len(kept_rewards), cfg.prompts_per_step)
        out = Collected(metrics, problems, rewards, np.concatenate(lengths), None, None)
        if n:
            out.batch = rollout_batch(kept_prompts[: n * g], np.concatenate(kept_tokens[:n]),
                                      np.concatenate(kept_logp[:n]), np.concatenate(kept_len[:n]), self.width,
                                      self.pad_id)
            if cfg.routing_replay:
                out.routing = routing_batch(kept_prompts[: n * g], [row for p, _ in kept_routing[:n] for row in p],
                                            np.concatenate([c for _, c in kept_routing[:n]]),
                                            np.concatenate(kept_len[:n]), self.width)
            out.advantages = group_advantages(np.asarray(kept_rewards[:n]),
                                              cfg.advantage_std).reshape(-1).astype(np.float32)
        return out

    def update(self, collected: Collected, step: int, rl_step: int, t0: float | None = None) -> dict:
        """``updates_per_rollout`` passes of ``minibatches`` updates over the kept groups; returns the
        step's policy and update metrics (means over its updates, r's 99th percentile over their tokens)."""
        cfg, g = self.cfg, self.cfg.samples_per_prompt
        ids, comp, sampler_lp = collected.batch
        n, full = ids.shape[0], cfg.prompts_per_step * g
        lengths = comp.sum(axis=1)  # completion tokens per kept row
        # The arrays always have a full step's rows, the missing groups' as padding rows with no
        # completion token (no policy loss, weight or metric sees them; the router's load-balancing
        # loss counts them, as it counts every row's padding positions), and every minibatch has
        # full / minibatches rows: the jitted steps compile once, not once per number of kept groups.
        ids, comp, sampler_lp = pad_rows(ids, full, self.pad_id), pad_rows(comp, full), pad_rows(sampler_lp, full)
        adv = pad_rows(collected.advantages, full)
        replay = None if collected.routing is None else pad_rows(collected.routing, full)  # [rows, width, L, k]
        rec = {}

        def expert_ids(rows=slice(None)):  # the rows' routing as the model takes it: [layers, rows, width, k]
            return None if replay is None else jnp.asarray(np.moveaxis(replay[rows], 2, 0))

        def policy_metrics(lp_now, entropy, mask, sampler):  # the trainer's policy, before any update, vs the sampler
            rec["entropy"] = float(entropy[mask].mean())
            rec["logprob_corr"] = float(np.corrcoef(lp_now[mask], sampler[mask])[0, 1]) if mask.sum() > 1 else 1.0

        old = sampler_lp
        if cfg.old_logp == "recomputed":  # pi_old = the trainer's own forward before the updates
            lp_now, entropy = self.fetch(policy_stats(self.model, jnp.asarray(ids), cfg.temperature, expert_ids()))
            policy_metrics(lp_now, entropy, comp, sampler_lp)
            old = np.where(comp, lp_now, 0.0).astype(np.float32)
        # The length stage these samples were generated in: its clip and IS-weight cap (m1jax/envs/length.py)
        stage = self.windows.overrides() if self.windows else {}
        loss_cfg = self.loss_cfg
        if "is_weight_max" in stage:
            loss_cfg = dataclasses.replace(loss_cfg, is_weight_max=stage["is_weight_max"])
        clip = jnp.float32(stage["max_grad_norm"]) if "max_grad_norm" in stage else None
        rec.update({f"length/{k}": v for k, v in stage.items()})
        rec["response_len_p50"] = float(np.percentile(lengths, 50))
        rec["response_len_p99"] = float(np.percentile(lengths, 99))
        if self.windows:  # p99 length and generation perplexity of this step; may advance the window
            rec.update(self.windows.update(rl_step, lengths, sampler_lp[comp]))
        groups = np.repeat(np.arange(len(adv) // g), g)
        padding = np.arange(n, full)
        mb_rows = [np.concatenate([rows, padding[: full // cfg.minibatches - len(rows)]])
                   for rows in np.array_split(np.random.default_rng(step).permutation(n), cfg.minibatches)]
        updates, ratios = [], []
        for _ in range(cfg.updates_per_rollout):
            for rows in mb_rows:
                w = token_weights(jnp.asarray(comp[rows]), jnp.asarray(np.unique(groups[rows], return_inverse=True)[1]),
                                  loss_cfg.aggregation)
                m = self.fetch(cispo_step(self.model, self.optimizer, jnp.asarray(ids[rows]), jnp.asarray(comp[rows]),
                                          jnp.asarray(old[rows]), jnp.asarray(adv[rows]), w, loss_cfg,
                                          jnp.asarray(sampler_lp[rows]), temperature=cfg.temperature,
                                          max_grad_norm=clip, expert_ids=expert_ids(rows)))
                self.guard(m["finite"], step)
                lp_now, entropy = m.pop("logp"), m.pop("entropy")
                if "entropy" not in rec and comp[rows].any():  # the first forward: the samples' parameters
                    policy_metrics(lp_now, entropy, comp[rows], sampler_lp[rows])
                ratios.append(m.pop("ratio")[comp[rows]])
                updates.append(m)
        rec.update({k: float(np.mean([u[k] for u in updates]))
                    for k in ("loss", "grad_norm", "is_weight_mean", "is_clipped_frac", "tis_weight_mean", "nll")})
        rec["is_ratio_p99"] = float(np.percentile(np.concatenate(ratios), 99))
        rec["skipped_updates"] = sum(not u["finite"] for u in updates)
        if t0 is not None:
            rec["tokens_per_s"] = float(lengths.sum() / (time.perf_counter() - t0))
        return rec
