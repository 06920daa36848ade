"""SFT warm start, then CISPO reinforcement learning, with metrics and resumable checkpoints.

    python train.py --config=configs/arith_cispo.py --workdir=runs/arith

Writes workdir/metrics.jsonl (one line per step), workdir/eval.json (held-out pass@1 after SFT,
i.e. before RL, and after RL), workdir/reward_curve.png, and orbax checkpoints in
workdir/checkpoints; running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/arith_cispo.py", "config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/arith", "output directory (checkpoints, metrics)")


def main(argv):
    del argv
    import dataclasses

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from m1jax import runs, storage
    from m1jax.configs import model_config
    from m1jax.data import arith, rewards
    from m1jax.model import MiniMaxM1
    from m1jax.optim import OptimConfig, make_optimizer
    from m1jax.rl import PRESETS, group_advantages, groups_with_signal, overlong_penalty, token_weights
    from m1jax.lm import token_logprobs
    from m1jax.rl.steps import cispo_step, sft_step
    from m1jax.rollout import SamplingParams, generate

    config = _CONFIG.value
    workdir = storage.prepare_dir(_WORKDIR.value)  # local path or gs://bucket/path
    storage.write_text(storage.join(workdir, runs.CONFIG_FILE), config.to_json_best_effort(indent=2))
    # Everything is validated before anything compiles.
    cfg = model_config(config)
    sft_opt_cfg = OptimConfig.from_dict(config.sft_optim.to_dict(), "sft_optim")
    rl_opt_cfg = OptimConfig.from_dict(config.rl_optim.to_dict(), "rl_optim")
    rl = config.rl
    if rl.loss not in PRESETS:
        raise ValueError(f"rl.loss={rl.loss!r}: use one of {sorted(PRESETS)}.")
    loss_cfg = dataclasses.replace(PRESETS[rl.loss], aggregation=rl.aggregation)
    if rl.loss == "cispo":
        loss_cfg = dataclasses.replace(loss_cfg, is_weight_max=rl.is_weight_max)
    if rl.old_logp not in ("sampler", "recomputed"):
        raise ValueError(f"rl.old_logp={rl.old_logp!r}: use 'sampler' or 'recomputed'.")
    if rl.tis_cap is not None:
        if rl.old_logp != "recomputed":
            raise ValueError("rl.tis_cap needs rl.old_logp='recomputed' (with sampler log-probs as pi_old the "
                             "sampler correction is already inside the CISPO ratio: it would count twice).")
        loss_cfg = dataclasses.replace(loss_cfg, tis_cap=rl.tis_cap)
    if rl.prompts_per_step % rl.minibatches:
        raise ValueError(f"rl.minibatches={rl.minibatches} must divide rl.prompts_per_step={rl.prompts_per_step}.")
    print(f"objective: {loss_cfg.describe()}", flush=True)
    digits = config.data.digits
    reward_fn = rewards.get(rl.reward)  # unknown names fail here, before compiling
    total_steps = config.sft.steps + rl.steps

    model = MiniMaxM1(cfg, rngs=nnx.Rngs(config.seed))
    sft_opt = nnx.Optimizer(model, make_optimizer(sft_opt_cfg), wrt=nnx.Param)
    rl_opt = nnx.Optimizer(model, make_optimizer(rl_opt_cfg), wrt=nnx.Param)
    sft_it = iter(arith.problems(config.seed, digits).batch(config.sft.batch_size, batch_fn=list).to_iter_dataset())
    rl_it = iter(arith.problems(config.seed + 1, digits).to_iter_dataset())
    key = jax.random.key(config.seed)

    # ---------------------------------------------------------------- checkpoints (resume)
    mgr = ocp.CheckpointManager(storage.join(workdir, runs.CHECKPOINTS),
                                options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep))
    start, meta = 0, {"eval_before": None}

    def pure(x):
        return nnx.to_pure_dict(nnx.state(x))

    if mgr.latest_step() is not None:
        step = mgr.latest_step()
        restored = mgr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(pure(model)), sft_opt=ocp.args.StandardRestore(pure(sft_opt)),
            rl_opt=ocp.args.StandardRestore(pure(rl_opt)), meta=ocp.args.JsonRestore()))
        for obj, name in ((model, "model"), (sft_opt, "sft_opt"), (rl_opt, "rl_opt")):
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(obj, state)
        meta = restored["meta"]
        sft_it.set_state(meta["sft_data"])
        rl_it.set_state(meta["rl_data"])
        key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))
        start = step
        print(f"resumed from checkpoint step {step}", flush=True)

    def save(step):
        meta.update(sft_data=sft_it.get_state(), rl_data=rl_it.get_state(),
                    key=np.asarray(jax.random.key_data(key)).tolist())
        mgr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(pure(model)), sft_opt=ocp.args.StandardSave(pure(sft_opt)),
            rl_opt=ocp.args.StandardSave(pure(rl_opt)), meta=ocp.args.JsonSave(meta)))

    # ---------------------------------------------------------------- evaluation
    eval_set = arith.eval_set(config.data.eval_size, digits, config.data.eval_seed)
    greedy = SamplingParams(greedy=True, max_new_tokens=digits + 2, stop_token_ids=(arith.EOS,))

    def pass_at_1():
        r = jax.device_get(generate(model, [p.prompt_ids for p in eval_set], greedy))
        return float(np.mean([arith.reward(r.tokens[i, :r.lengths[i]], p.answer) for i, p in enumerate(eval_set)]))

    metrics_file = storage.open_append(storage.join(workdir, "metrics.jsonl"))

    def log(rec):
        metrics_file.write(json.dumps({k: (float(v) if hasattr(v, "__float__") else v) for k, v in rec.items()}) + "\n")
        metrics_file.flush()

    t_start = time.perf_counter()
    nonfinite = 0
    sampling = SamplingParams(temperature=rl.temperature, max_new_tokens=digits + 2, stop_token_ids=(arith.EOS,))
    for step in range(start, total_steps):
        if step < config.sft.steps:  # ------------------------------------------------ SFT
            ids, mask = arith.sft_batch(next(sft_it))
            m = jax.device_get(sft_step(model, sft_opt, jnp.asarray(ids), jnp.asarray(mask)))
            if step % config.log_every == 0 or step == config.sft.steps - 1:
                log({"step": step, "phase": "sft", **m})
                print(f"\rsft {step + 1}/{config.sft.steps} loss {float(m['sft_loss']):.3f}", end="", flush=True)
            if step == config.sft.steps - 1:
                meta["eval_before"] = pass_at_1()
                print(f"\nheld-out pass@1 after SFT (before RL): {meta['eval_before']:.3f}", flush=True)
                log({"step": step, "phase": "eval", "pass_at_1": meta["eval_before"]})
        else:  # -------------------------------------------------------------------------- RL
            t0 = time.perf_counter()
            kept_ids, kept_rewards, kept_old, kept_len, n_gen, all_rewards = [], [], [], [], 0, []
            n_reward_failures = 0
            while len(kept_rewards) < rl.prompts_per_step and n_gen < rl.max_gen_batches:
                probs = [next(rl_it) for _ in range(rl.prompts_per_step)]
                key, sub = jax.random.split(key)
                r = jax.device_get(generate(model, [p.prompt_ids for p in probs], sampling,
                                            num_samples=rl.samples_per_prompt, key=sub))
                g = rl.samples_per_prompt
                texts = [arith.completion_text(r.tokens[i, :r.lengths[i]]) for i in range(len(probs) * g)]
                report = rewards.score_all(reward_fn, [arith.decode(p.prompt_ids) for p in probs for _ in range(g)],
                                           texts, [p.answer for p in probs for _ in range(g)], rl.reward_timeout_s)
                n_reward_failures += report.errors + report.timeouts
                for msg in report.messages[:3]:
                    print(f"\nreward failure (scored 0): {msg}", flush=True)
                scores = np.asarray(report.scores).reshape(len(probs), g)
                if rl.overlong_cache_len > 0:  # DAPO soft overlong penalty, in tokens
                    scores = scores + overlong_penalty(np.asarray(r.lengths), sampling.max_new_tokens,
                                                       rl.overlong_cache_len).reshape(len(probs), g)
                all_rewards.append(scores)
                keep = groups_with_signal(scores) if rl.dynamic_sampling else np.ones(len(probs), bool)
                for i in np.flatnonzero(keep):
                    rows = slice(i * g, (i + 1) * g)
                    kept_ids.append(np.concatenate([np.tile(probs[i].prompt_ids, (g, 1)), r.tokens[rows]], 1))
                    kept_old.append(r.logprobs[rows])
                    kept_len.append(r.lengths[rows])
                    kept_rewards.append(scores[i])
                n_gen += 1
            all_rewards = np.concatenate(all_rewards)
            n_failures_step, n_reward_failures = n_reward_failures, 0
            rec = {"step": step, "phase": "rl", "reward_mean": all_rewards.mean(),
                   "pass_rate": (all_rewards > 0).mean(), "groups_kept": len(kept_rewards), "gen_batches": n_gen,
                   "reward_failures": n_failures_step}
            if kept_rewards:
                kept_rewards = kept_rewards[: rl.prompts_per_step]
                n = len(kept_rewards)
                ids = np.concatenate(kept_ids[:n])
                lengths = np.concatenate(kept_len[:n])
                plen = len(eval_set[0].prompt_ids)
                t = ids.shape[1]
                comp = (np.arange(t - 1)[None] >= plen - 1) & (np.arange(t - 1)[None] < plen - 1 + lengths[:, None])
                old = np.zeros((ids.shape[0], t - 1), np.float32)
                old[:, plen - 1:] = np.concatenate(kept_old[:n])
                adv = group_advantages(np.asarray(kept_rewards), rl.advantage_std).reshape(-1).astype(np.float32)
                lp_now = np.asarray(token_logprobs(model, jnp.asarray(ids))[0])
                rec["logprob_corr"] = float(np.corrcoef(lp_now[comp], old[comp])[0, 1]) if comp.sum() > 1 else 1.0
                sampler_lp = old
                if rl.old_logp == "recomputed":  # pi_old = the trainer's own forward before the updates
                    old = np.where(comp, lp_now, 0.0).astype(np.float32)
                rec["response_len_p50"] = float(np.percentile(lengths, 50))
                rec["response_len_p99"] = float(np.percentile(lengths, 99))
                mb_rows = np.array_split(np.random.default_rng(step).permutation(ids.shape[0]), rl.minibatches)
                for _ in range(rl.updates_per_rollout):
                    for rows in mb_rows:
                        w = token_weights(jnp.asarray(comp[rows]), aggregation=loss_cfg.aggregation)
                        m = jax.device_get(cispo_step(model, rl_opt, jnp.asarray(ids[rows]), jnp.asarray(comp[rows]),
                                                      jnp.asarray(old[rows]), jnp.asarray(adv[rows]), w, loss_cfg,
                                                      jnp.asarray(sampler_lp[rows])))
                        nonfinite = 0 if m["finite"] else nonfinite + 1
                        if nonfinite >= config.max_nonfinite_in_a_row:
                            raise FloatingPointError(
                                f"{nonfinite} non-finite updates in a row at step {step}; updates were skipped. "
                                "Lower rl_optim.learning_rate or check the data.")
                rec.update({k: m[k] for k in ("loss", "grad_norm", "is_weight_mean", "is_clipped_frac", "nll")})
                rec["tokens_per_s"] = float(lengths.sum() / (time.perf_counter() - t0))
            log(rec)
            print(f"\rrl {step - config.sft.steps + 1}/{rl.steps} reward {rec['reward_mean']:.3f} "
                  f"kept {rec['groups_kept']}", end="", flush=True)
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == total_steps:
            save(step + 1)
        if config.get("crash_after_step") is not None and step + 1 == config.crash_after_step:
            mgr.wait_until_finished()
            raise SystemExit(f"crash_after_step={config.crash_after_step}: simulated crash (testing hook)")
    mgr.wait_until_finished()
    after = pass_at_1()
    before = meta["eval_before"]
    result = {"pass_at_1_before_rl": before, "pass_at_1_after_rl": after,
              "gain_points": None if before is None else 100 * (after - before),
              "eval_size": len(eval_set), "wall_s": time.perf_counter() - t_start}
    storage.write_text(storage.join(workdir, "eval.json"), json.dumps(result, indent=2))
    print(f"\nheld-out pass@1: {before} after SFT -> {after:.3f} after RL", flush=True)
    _plot(workdir)


def _plot(workdir):
    import json as _json

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no reward_curve.png)")
        return
    from m1jax import storage

    recs = [_json.loads(line) for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
    rl = [r for r in recs if r.get("phase") == "rl"]
    if not rl:
        return
    fig = plt.figure(figsize=(5, 3))
    plt.plot([r["step"] for r in rl], [r["reward_mean"] for r in rl])
    plt.xlabel("step")
    plt.ylabel("mean reward (sampled, T=1)")
    plt.tight_layout()
    storage.save_figure(fig, storage.join(workdir, "reward_curve.png"))


if __name__ == "__main__":
    sys.exit(app.run(main))
