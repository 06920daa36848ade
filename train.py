"""SFT warm start, then CISPO reinforcement learning, with metrics and resumable checkpoints.

    python train.py --config=configs/arith_cispo.py --workdir=runs/arith

Writes workdir/metrics.jsonl (one line per step), workdir/eval.json (held-out pass@1 after SFT,
i.e. before RL, and after RL), workdir/reward_curve.png, and orbax checkpoints in
workdir/checkpoints; running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import io
import json
import sys
import time

from absl import app, flags

from m1jax import cli, distributed

_CONFIG = cli.define_config("train.py", "config", "configs/arith_cispo.py", "config file")
_WORKDIR = flags.DEFINE_string("workdir", "runs/arith", "output directory (checkpoints, metrics)")
_PROCESS_FLAGS = distributed.define_flags()  # multi-host: the same command on every host
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config (file + overrides) and exit")


def main(argv):
    del argv
    if _PRINT_CONFIG.value:
        return cli.print_config(_CONFIG.value)
    distributed.maybe_initialize(*(f.value for f in _PROCESS_FLAGS))  # before any other JAX call
    fetch = distributed.fetch  # device_get that gathers what other processes' devices hold
    import dataclasses
    import functools
    import math

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from m1jax import runs, sharding, storage
    from m1jax.configs import model_config
    from m1jax.data import rewards, tasks
    from m1jax.data.problem import completion_text, sft_batch
    from m1jax.metrics import EventFileWriter, MetricsWriter, ProgressBar, event_file_name
    from m1jax.model import MiniMaxM1
    from m1jax.optim import OptimConfig, make_optimizer
    from m1jax.rl import PRESETS, group_advantages, groups_with_signal, overlong_penalty, token_weights
    from m1jax.rl.batch import rollout_batch
    from m1jax.rl.steps import cispo_step, policy_stats, sft_step
    from m1jax.rollout import SamplingParams, generate, generate_slots, left_pad

    config = _CONFIG.value
    # Everything is checked before anything compiles or is written: a mistake is one line, exit code 2.
    with cli.user_errors("train.py"):
        storage.check_bucket(_WORKDIR.value)  # a gs:// workdir's bucket must exist
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
        ro = config.get("rollout", {})
        if ro.get("engine", "continuous") not in ("continuous", "static"):
            raise ValueError(f"rollout.engine={ro['engine']!r}: use 'continuous' (the slot engine) or 'static'.")
        if isinstance(ro.get("slots", 0), bool) or not isinstance(ro.get("slots", 0), int) or ro.get("slots", 0) < 0:
            raise ValueError(f"rollout.slots={ro['slots']!r}: must be an integer >= 0 (0: every sample of a call at once).")
        if rl.prompts_per_step % rl.minibatches:
            raise ValueError(f"rl.minibatches={rl.minibatches} must divide rl.prompts_per_step={rl.prompts_per_step}.")
        print(f"objective: {loss_cfg.describe()}", flush=True)
        mesh = sharding.mesh_from_config(config.get("mesh") and config.mesh.to_dict())
        sharding.validate_model_for_mesh(cfg, mesh)
        print(sharding.describe_mesh(mesh), flush=True)
        # A training step's rows are split evenly over the mesh's batch shards (sampling pads itself).
        shards, g = sharding.batch_shards(mesh), rl.samples_per_prompt
        for key, rows in (("sft.batch_size", config.sft.batch_size),
                          ("rl.prompts_per_step * rl.samples_per_prompt / rl.minibatches",
                           rl.prompts_per_step * g // rl.minibatches)):
            if rows % shards:
                raise ValueError(f"{key} = {rows} rows, not a multiple of the mesh's {shards} batch shards "
                                 "(mesh.data * mesh.fsdp * mesh.expert): change one or the other.")
        # With fewer kept groups than rl.prompts_per_step (dynamic sampling ran out of generation
        # batches), train on a number of groups whose minibatches still split evenly over the shards.
        group_unit = 1 if shards == 1 else shards * rl.minibatches // math.gcd(g, shards * rl.minibatches)
        # An environment curriculum (config.curriculum) replaces data.task; config.length stages the window.
        curriculum = windows = None
        if config.get("curriculum") is not None:
            from m1jax.envs.curriculum import Curriculum
            from m1jax.envs.genrm import LengthBiasMonitor

            curriculum, length_bias = Curriculum(config.curriculum), LengthBiasMonitor()
        task = curriculum.task() if curriculum else tasks.make_task(config.data)  # data files are read and checked here
        tok = task.tokenizer
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens: "
                             f"set --config.model.vocab_size={tok.vocab_size}.")
        width = task.max_prompt_len + task.max_new_tokens  # every training row: prompt, completion, pad
        # fn(prompts, completions, references, timeout_s) -> ScoreReport; unknown reward names fail here
        score_all = curriculum.score_all if curriculum else functools.partial(rewards.score_all, rewards.get(rl.reward))
        if config.get("length") is not None:
            from m1jax.envs.length import LengthSchedule

            windows = LengthSchedule(config.length, task.max_new_tokens)
        # SFT runs config.sft.steps steps, or stops early at the first held-out evaluation (every
        # sft.eval_every steps) that reaches sft.stop_at_pass_at_1: RL then starts from a comparable
        # model whatever the SFT trajectory (tiny models learn addition in a sudden jump whose step
        # varies by hundreds between seeds, or with the summation order of a kernel).
        stop_at, eval_every = config.sft.get("stop_at_pass_at_1"), config.sft.get("eval_every", 50)
        if stop_at is not None and not (0 < stop_at <= 1 and eval_every >= 1):
            raise ValueError(f"sft.stop_at_pass_at_1={stop_at} / sft.eval_every={eval_every}: the threshold must be "
                             "in (0, 1] and the interval >= 1 step (or set stop_at_pass_at_1=None to run all sft.steps).")
    workdir = storage.prepare_dir(_WORKDIR.value)  # local path or gs://bucket/path
    primary = distributed.is_primary()  # in a multi-process run only process 0 writes the logs and reports
    if primary:
        storage.write_text(storage.join(workdir, runs.CONFIG_FILE), config.to_json_best_effort(indent=2))

    # sampling and training on one mesh: parameters (and so the optimizer state) sharded
    model = sharding.build_on_mesh(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(config.seed)), mesh)
    print(sharding.describe_params(model), flush=True)
    sft_opt = nnx.Optimizer(model, make_optimizer(sft_opt_cfg), wrt=nnx.Param)
    rl_opt = nnx.Optimizer(model, make_optimizer(rl_opt_cfg), wrt=nnx.Param)
    sft_it = iter(task.stream(config.seed).batch(config.sft.batch_size, batch_fn=list).to_iter_dataset())
    rl_it = curriculum.iterator(config.seed + 1) if curriculum else iter(task.stream(config.seed + 1).to_iter_dataset())
    key = jax.random.key(config.seed)

    # ---------------------------------------------------------------- checkpoints (resume)
    mgr = ocp.CheckpointManager(storage.join(workdir, runs.CHECKPOINTS),
                                options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep))
    start, meta = 0, {"eval_before": None, "sft_end": None if config.sft.steps else 0}

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
        if windows:
            windows.restore(meta["length"])
        key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))
        start = step
        if "sft_end" not in meta:  # a checkpoint written before SFT could stop early
            meta["sft_end"] = config.sft.steps if start >= config.sft.steps else None
        print(f"resumed from checkpoint step {step}", flush=True)

    def total_steps():  # SFT's steps (all of them until it has ended) + RL's
        return (config.sft.steps if meta["sft_end"] is None else meta["sft_end"]) + rl.steps

    def save(step):
        meta.update(sft_data=sft_it.get_state(), rl_data=rl_it.get_state(), length=windows and windows.state(),
                    key=np.asarray(jax.random.key_data(key)).tolist())
        mgr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(pure(model)), sft_opt=ocp.args.StandardSave(pure(sft_opt)),
            rl_opt=ocp.args.StandardSave(pure(rl_opt)), meta=ocp.args.JsonSave(meta)))

    # ---------------------------------------------------------------- evaluation
    bar = ProgressBar(total_steps(), start, every=config.log_every, stream=None if primary else io.StringIO())
    eval_set = task.eval_set
    greedy = SamplingParams(greedy=True, max_new_tokens=task.max_new_tokens, stop_token_ids=(tok.eos_id,))
    sampling = SamplingParams(temperature=rl.temperature, max_new_tokens=task.max_new_tokens,
                              stop_token_ids=(tok.eos_id,))

    engine, slots = ro.get("engine", "continuous"), ro.get("slots", 0)

    def sample(probs, params, num_samples=1, key=None, max_new_tokens=None):
        """Completions of problems: on the slot engine (fresh slots each call, prompt width
        task.max_prompt_len and params.max_new_tokens completion columns: one compiled shape; each
        sample's limit max_new_tokens), or in one static batch, prompts left-padded to
        task.max_prompt_len."""
        if engine == "continuous":
            n = slots or len(probs) * num_samples
            r = generate_slots(model, [p.prompt_ids for p in probs], params, num_samples, key=key,
                               slots=-(-n // shards) * shards, max_new_tokens=max_new_tokens,
                               prompt_width=task.max_prompt_len)
            return r.rollout
        if max_new_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=max_new_tokens)
        ids, mask = left_pad([p.prompt_ids for p in probs], tok.pad_id)
        pad = ((0, 0), (task.max_prompt_len - ids.shape[1], 0))
        return fetch(generate(model, np.pad(ids, pad, constant_values=tok.pad_id), params,
                              num_samples=num_samples, key=key, prompt_mask=np.pad(mask, pad)))

    def score(probs, r, g):
        """Rewards of the g samples of each problem (rows i*g ... i*g+g-1); failures print and score 0."""
        report = score_all(
            [tok.decode(p.prompt_ids) for p in probs for _ in range(g)],
            [completion_text(tok, r.tokens[i, :r.lengths[i]]) for i in range(len(probs) * g)],
            [p.answer for p in probs for _ in range(g)], rl.reward_timeout_s)
        for msg in report.messages[:3]:
            bar.message(f"reward failure (scored 0): {msg}")
        return report

    def pass_at_1():
        """Held-out greedy pass@1: a completion passes when its reward is > 0."""
        return float(np.mean(np.asarray(score(eval_set, sample(eval_set, greedy), 1).scores) > 0))

    if primary:
        storage.prepare_dir(storage.join(workdir, "tb"))
        metrics = MetricsWriter(
            storage.open_append(storage.join(workdir, "metrics.jsonl")),
            EventFileWriter(storage.open_append(storage.join(workdir, "tb", event_file_name()), binary=True),
                            resume_step=start if start else None))
    else:
        metrics = MetricsWriter(io.StringIO())
    log = metrics.write

    nonfinite = 0

    def count_nonfinite(finite, step):
        """Non-finite updates are skipped (optax.apply_if_finite); stop after a run of them."""
        nonlocal nonfinite
        nonfinite = 0 if finite else nonfinite + 1
        if nonfinite >= config.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"{nonfinite} non-finite updates in a row at step {step} (loss or gradient NaN/inf); they were "
                "skipped. Lower the learning rate (sft_optim / rl_optim) or check the data.")

    t_start = time.perf_counter()
    step = start
    while step < total_steps():
        if meta["sft_end"] is None:  # ------------------------------------------------------ SFT
            ids, mask = sft_batch(next(sft_it), tok, width)
            m = fetch(sft_step(model, sft_opt, jnp.asarray(ids), jnp.asarray(mask)))
            last = step == config.sft.steps - 1
            if step % config.log_every == 0 or last or not m["finite"]:
                log({"step": step, "phase": "sft", **m})
            count_nonfinite(m["finite"], step)
            bar.update(step + 1, f"sft loss {float(m['sft_loss']):.3f}")
            if last or (stop_at is not None and (step + 1) % eval_every == 0):
                p = pass_at_1()
                log({"step": step, "phase": "eval", "pass_at_1": p})
                if last or p >= stop_at:
                    meta.update(eval_before=p, sft_end=step + 1)
                    bar.total = total_steps()
                    bar.message(f"held-out pass@1 after SFT (before RL): {p:.3f}, SFT ended at step {step + 1}")
        else:  # -------------------------------------------------------------------------- RL
            t0 = time.perf_counter()
            rl_step = step - meta["sft_end"]
            if curriculum:  # this step's mixture weights
                rl_it.set_step(rl_step)
            window = windows.window if windows else task.max_new_tokens  # this step's generation window
            step_probs, step_lengths = [], []
            kept_prompts, kept_tokens, kept_logp, kept_len, kept_rewards, all_rewards = [], [], [], [], [], []
            n_gen = n_failures = 0
            while len(kept_rewards) < rl.prompts_per_step and n_gen < rl.max_gen_batches:
                probs = [next(rl_it) for _ in range(rl.prompts_per_step)]
                key, sub = jax.random.split(key)
                r = sample(probs, sampling, g, sub, max_new_tokens=window if windows else None)
                step_probs += probs
                step_lengths.append(r.lengths)
                report = score(probs, r, g)
                n_failures += report.errors + report.timeouts
                scores = np.asarray(report.scores).reshape(len(probs), g)
                if rl.overlong_cache_len > 0:  # DAPO soft overlong penalty, in tokens
                    scores = scores + overlong_penalty(np.asarray(r.lengths), window,
                                                       rl.overlong_cache_len).reshape(len(probs), g)
                all_rewards.append(scores)
                keep = groups_with_signal(scores) if rl.dynamic_sampling else np.ones(len(probs), bool)
                for i in np.flatnonzero(keep):
                    rows = slice(i * g, (i + 1) * g)
                    kept_prompts += [probs[i].prompt_ids] * g
                    kept_tokens.append(r.tokens[rows])
                    kept_logp.append(r.logprobs[rows])
                    kept_len.append(r.lengths[rows])
                    kept_rewards.append(scores[i])
                n_gen += 1
            all_rewards = np.concatenate(all_rewards)
            rec = {"step": step, "phase": "rl", "reward_mean": all_rewards.mean(),
                   "pass_rate": (all_rewards > 0).mean(), "groups_kept": len(kept_rewards), "gen_batches": n_gen,
                   "reward_failures": n_failures}
            n = min(len(kept_rewards), rl.prompts_per_step) // group_unit * group_unit
            if n:
                lengths = np.concatenate(kept_len[:n])
                ids, comp, sampler_lp = rollout_batch(kept_prompts[: n * g], np.concatenate(kept_tokens[:n]),
                                                      np.concatenate(kept_logp[:n]), lengths, width, tok.pad_id)
                adv = group_advantages(np.asarray(kept_rewards[:n]), rl.advantage_std).reshape(-1).astype(np.float32)
                # The sampling policy on its own samples (the trainer's forward, before the updates).
                lp_now, entropy = fetch(policy_stats(model, jnp.asarray(ids), rl.temperature))
                rec["entropy"] = float(entropy[comp].mean())
                rec["logprob_corr"] = float(np.corrcoef(lp_now[comp], sampler_lp[comp])[0, 1]) if comp.sum() > 1 else 1.0
                old = sampler_lp
                if rl.old_logp == "recomputed":  # pi_old = the trainer's own forward before the updates
                    old = np.where(comp, lp_now, 0.0).astype(np.float32)
                rec["response_len_p50"] = float(np.percentile(lengths, 50))
                rec["response_len_p99"] = float(np.percentile(lengths, 99))
                if windows:  # p99 length and generation perplexity of this step; may advance the window
                    rec.update(windows.update(rl_step, lengths, sampler_lp[comp]))
                groups = np.repeat(np.arange(n), g)
                mb_rows = np.array_split(np.random.default_rng(step).permutation(ids.shape[0]), rl.minibatches)
                updates, ratios = [], []
                for _ in range(rl.updates_per_rollout):
                    for rows in mb_rows:
                        w = token_weights(jnp.asarray(comp[rows]), jnp.asarray(np.unique(groups[rows], return_inverse=True)[1]),
                                          loss_cfg.aggregation)
                        m = fetch(cispo_step(model, rl_opt, jnp.asarray(ids[rows]), jnp.asarray(comp[rows]),
                                                      jnp.asarray(old[rows]), jnp.asarray(adv[rows]), w, loss_cfg,
                                                      jnp.asarray(sampler_lp[rows]), temperature=rl.temperature))
                        count_nonfinite(m["finite"], step)
                        ratios.append(m.pop("ratio")[comp[rows]])
                        updates.append(m)
                # Means over the step's minibatch updates; r's 99th percentile over all their tokens.
                rec.update({k: float(np.mean([u[k] for u in updates]))
                            for k in ("loss", "grad_norm", "is_weight_mean", "is_clipped_frac", "nll")})
                rec["is_ratio_p99"] = float(np.percentile(np.concatenate(ratios), 99))
                rec["skipped_updates"] = sum(not u["finite"] for u in updates)
                rec["tokens_per_s"] = float(lengths.sum() / (time.perf_counter() - t0))
            if curriculum:
                rec.update(curriculum.weights(rl_step))
                rec.update(curriculum.metrics(step_probs, all_rewards, np.concatenate(step_lengths)))
                # reward vs length correlation; flag when reward grows with length but "solved" does not
                rec.update(length_bias.update(all_rewards, np.concatenate(step_lengths), all_rewards >= 1))
            if windows:
                rec.setdefault("length/window", window)
            log(rec)
            bar.update(step + 1, f"rl reward {rec['reward_mean']:.3f} kept {rec['groups_kept']}")
        if (step + 1) % config.checkpoint.every == 0 or step + 1 == total_steps():
            save(step + 1)
        if config.get("crash_after_step") is not None and step + 1 == config.crash_after_step:
            mgr.wait_until_finished()
            raise SystemExit(f"crash_after_step={config.crash_after_step}: simulated crash (testing hook)")
        step += 1
    mgr.wait_until_finished()
    after = pass_at_1()
    before = meta["eval_before"]
    result = {"pass_at_1_before_rl": before, "pass_at_1_after_rl": after,
              "gain_points": None if before is None else 100 * (after - before),
              "eval_size": len(eval_set), "wall_s": time.perf_counter() - t_start}
    log({"step": total_steps(), "phase": "eval", "pass_at_1": after})
    metrics.close()
    bar.message(f"held-out pass@1: {before} after SFT -> {after:.3f} after RL")
    if primary:
        storage.write_text(storage.join(workdir, "eval.json"), json.dumps(result, indent=2))
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
    sys.exit(app.run(main, flags_parser=cli.flags_parser("train.py", "config", "configs/arith_cispo.py")))
