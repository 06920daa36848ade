"""SFT warm start, then RL (CISPO by default), with evaluation, metrics and resumable checkpoints.

    setup = training.setup(config, workdir)   # checks everything; compiles and writes nothing
    result = training.train_and_evaluate(setup)

``train.py`` is the command line around these two calls. The run directory's format is
m1jax/checkpoints/runs.py's; the RL step is m1jax/rl/learner.py's.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from m1jax import distributed, sharding, storage
from m1jax.checkpoints import runs
from m1jax.configs import model_config
from m1jax.data import tasks
from m1jax.data.problem import completion_text, sft_batch
from m1jax.metrics import EventFileWriter, MetricsWriter, ProgressBar, event_file_name
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.optim import OptimConfig, make_optimizer
from m1jax.rl.learner import NonFiniteGuard, RLConfig, RLLearner
from m1jax.rl.steps import sft_step
from m1jax.rollout import SamplingParams, generate, generate_slots, left_pad
from m1jax.rollout.slots import check_engine_config


@dataclasses.dataclass
class Setup:
    """A checked training run: its configs, mesh, task and reward; nothing compiled or written yet."""

    config: ml_collections.ConfigDict
    workdir: str
    model: ModelConfig
    sft_optim: OptimConfig
    rl_optim: OptimConfig
    rl: RLConfig
    mesh: Any
    shards: int  # the mesh's batch shards
    task: tasks.Task  # the problems and their scoring (m1jax/data/tasks.py)
    sampling: SamplingParams | None = None  # RL rollouts' (rl.temperature, early truncation)
    windows: Any = None  # the length schedule (config.length)
    stop_at: float | None = None  # SFT ends once held-out pass@1 >= this ...
    eval_every: int = 50
    stop_in_a_row: int = 1  # ... on this many evaluations in a row


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Check a training config (model, optimizers, rl, rollout, mesh, data files, reward) before
    anything compiles or is written; every mistake raises ValueError or FileNotFoundError naming it."""
    storage.check_bucket(workdir)  # a gs:// workdir's bucket must exist
    cfg = model_config(config)
    if config.get("init_from"):
        cfg = init_config(config.init_from, cfg)
    sft_optim = OptimConfig.from_dict(config.sft_optim.to_dict(), "sft_optim")
    opt = config.rl_optim.to_dict()
    if config.rl.steps == 0 and opt.get("schedule") == "cosine":  # no RL update runs: any length will do
        opt["total_steps"] = max(opt.get("total_steps", 0), 1)
    rl_optim = OptimConfig.from_dict(opt, "rl_optim")
    rl = RLConfig.from_dict(config.rl.to_dict())
    check_engine_config(config.get("rollout", {}))
    print(f"objective: {rl.loss_config().describe()}", flush=True)
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
    # config.data (or an environment curriculum, config.curriculum) and its reward: data files are
    # read and checked here, unknown reward names fail here. config.length stages the window.
    task, windows = tasks.from_config(config), None
    tok = task.tokenizer
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens: "
                         f"set --config.model.vocab_size={tok.vocab_size}.")
    # RL samples at rl.temperature, truncated early by repetition as rl.repetition_* (default: the
    # config's sampling section, i.e. the model's: on in configs/minimax_m1_rl.py, off in the toys).
    default = config.get("sampling") or {}
    sampling = SamplingParams(
        temperature=rl.temperature, max_new_tokens=task.max_new_tokens, stop_token_ids=(tok.eos_id,),
        repetition_window=default.get("repetition_window", 0) if rl.repetition_window is None else rl.repetition_window,
        repetition_prob=default.get("repetition_prob", 0.99) if rl.repetition_prob is None else rl.repetition_prob)
    if config.get("length") is not None:
        from m1jax.envs.length import LengthSchedule

        windows = LengthSchedule(config.length, task.max_new_tokens)
        stage_clip = windows.per_stage.get("max_grad_norm", ())
        if stage_clip and rl_optim.max_grad_norm > 0 and max(stage_clip) > rl_optim.max_grad_norm:
            raise ValueError(f"length.max_grad_norm={stage_clip}: above rl_optim.max_grad_norm="
                             f"{rl_optim.max_grad_norm}, which clips after it (a stage can only lower the clip): "
                             "lower the stage values or raise rl_optim.max_grad_norm.")
        if "is_weight_max" in windows.per_stage and rl.loss != "cispo":
            raise ValueError(f"length.is_weight_max is CISPO's IS-weight cap; rl.loss={rl.loss!r} has none: "
                             "remove it or use rl.loss='cispo'.")
    # SFT runs config.sft.steps steps, or stops early at the first held-out evaluation (every
    # sft.eval_every steps) that reaches sft.stop_at_pass_at_1, or at the last of
    # sft.stop_evals_in_a_row such evaluations in a row (a noisy peak then does not end SFT): RL then
    # starts from a comparable model whatever the SFT trajectory (tiny models learn addition in a
    # sudden jump whose step varies by hundreds between seeds, or with the summation order of a kernel).
    stop_at, eval_every = config.sft.get("stop_at_pass_at_1"), config.sft.get("eval_every", 50)
    in_a_row = config.sft.get("stop_evals_in_a_row", 1)
    if stop_at is not None and not (0 < stop_at <= 1 and eval_every >= 1 and in_a_row >= 1):
        raise ValueError(f"sft.stop_at_pass_at_1={stop_at} / sft.eval_every={eval_every} / sft.stop_evals_in_a_row="
                         f"{in_a_row}: the threshold must be in (0, 1], the interval and the count >= 1 (or set "
                         "stop_at_pass_at_1=None to run all sft.steps).")
    return Setup(config, workdir, cfg, sft_optim, rl_optim, rl, mesh, shards, task, sampling, windows,
                 stop_at, eval_every, in_a_row)


# What a checkpoint's config.json fixes (the weights' shapes); init_from refuses a config.model
# that differs in one of them. Its conventions (residual alphas, RoPE, decay) come from the checkpoint.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "layer_types",
                "num_experts", "num_experts_per_tok", "intermediate_size")
# How the model computes, not what it is: these come from config.model.
RUNTIME = ("dtype", "param_dtype", "lm_head_fp32", "lightning_impl", "pallas_backend", "moe_impl", "moe_chunk",
           "moe_capacity_factor", "attention_chunk", "block_size", "scan_layers", "remat", "remat_layers",
           "router_aux_loss_coef")


def init_config(path: str, cfg: ModelConfig) -> ModelConfig:
    """The model config of a run that starts from checkpoint ``path`` (transformers or original
    MiniMax format): the checkpoint's, with ``cfg``'s RUNTIME fields; its ARCHITECTURE must be cfg's."""
    from m1jax.checkpoints import hf

    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={path}: no such directory (a MiniMax checkpoint: config.json + "
                                "*.safetensors, e.g. from m1jax.checkpoints.export or Hugging Face).")
    ckpt = hf.read_config(path)
    for key in ARCHITECTURE:
        if getattr(ckpt, key) != getattr(cfg, key):
            raise ValueError(f"init_from={path}: its config.json has {key}={getattr(ckpt, key)!r}, the config's "
                             f"model.{key}={getattr(cfg, key)!r}: set --config.model.{key} to match (or use the "
                             "checkpoint the config describes).")
    return ckpt.replace(**{key: getattr(cfg, key) for key in RUNTIME})


def dry_run(s: Setup) -> dict:
    """What a checked run would hold per device, from the abstract model on the setup's mesh
    (nothing allocated, compiled or written): parameters, gradients and AdamW moments exactly, an
    RL minibatch's activations estimated (m1jax.plan.memory). Prints one line; returns the bytes."""
    from m1jax.plan.memory import plan

    mc = sharding.MeshConfig(**dict(s.mesh.shape))
    rows = s.rl.prompts_per_step * s.rl.samples_per_prompt // s.rl.minibatches
    width = s.task.max_prompt_len + s.task.max_new_tokens
    r = plan(s.model, mc, rows, width)
    gib = {k: r[k] / 2**30 for k in ("params", "grads", "opt", "act", "total")}
    stats = s.mesh.devices.flat[0].memory_stats() or {}  # GPU/TPU: the device's memory; CPU: none
    fits = ""
    if stats.get("bytes_limit"):
        limit = stats["bytes_limit"] / 2**30
        fits = (f" (fits the devices' {limit:.1f} GiB)" if gib["total"] < limit else
                f" (does NOT fit the devices' {limit:.1f} GiB: python -m m1jax.plan --mesh=auto finds a mesh)")
    print(f"dry run: {s.model.param_count():,} parameters on mesh {dict(s.mesh.shape)}; per device "
          f"{gib['params']:.1f} GiB parameters + {gib['grads']:.1f} GiB gradients + {gib['opt']:.1f} GiB AdamW + "
          f"~{gib['act']:.1f} GiB activations ({rows} rows x {width} tokens per update) = {gib['total']:.1f} GiB"
          f"{fits}; config checked, nothing compiled or written", flush=True)
    return r


def train_and_evaluate(s: Setup) -> dict:
    """Run (or resume) the training of a checked ``Setup``; returns eval.json's contents."""
    config, rl, task, windows = s.config, s.rl, s.task, s.windows
    fetch = distributed.fetch  # device_get that gathers what other processes' devices hold
    workdir = storage.prepare_dir(s.workdir)  # local path or gs://bucket/path
    primary = distributed.is_primary()  # in a multi-process run only process 0 writes the logs and reports
    if primary:
        storage.write_text(storage.join(workdir, runs.CONFIG_FILE), config.to_json_best_effort(indent=2))
    tok = task.tokenizer
    width = task.max_prompt_len + task.max_new_tokens  # every training row: prompt, completion, pad

    # sampling and training on one mesh: parameters (and so the optimizer state) sharded
    if config.get("init_from") and runs.latest_step(workdir) is None:  # a fresh run from a checkpoint
        model = load_init(config.init_from, s.model, s.mesh)
    else:  # random (replaced by the run's own checkpoint when it resumes)
        model = sharding.build_on_mesh(lambda: MiniMaxM1(s.model, rngs=nnx.Rngs(config.seed)), s.mesh)
    print(sharding.describe_params(model), flush=True)
    sft_opt = nnx.Optimizer(model, make_optimizer(s.sft_optim), wrt=nnx.Param)
    rl_opt = nnx.Optimizer(model, make_optimizer(s.rl_optim), wrt=nnx.Param)
    sft_it = iter(task.stream(config.seed).batch(config.sft.batch_size, batch_fn=list).to_iter_dataset())
    rl_it = task.rl_iterator(config.seed + 1)
    guard = NonFiniteGuard(config.max_nonfinite_in_a_row)

    # ---------------------------------------------------------------- sampling, scoring, evaluation
    ro = config.get("rollout", {})
    engine, slots = ro.get("engine", "continuous"), ro.get("slots", 0)
    kv_dtype = ro.get("kv_dtype") or None  # the sampler's softmax-layer KV caches (None: the compute dtype)
    greedy = SamplingParams(greedy=True, max_new_tokens=task.max_new_tokens, stop_token_ids=(tok.eos_id,))

    def sample(probs, params, num_samples=1, key=None, max_new_tokens=None, record=False):
        """Completions of problems: on the slot engine (fresh slots each call, prompt width
        task.max_prompt_len and params.max_new_tokens completion columns: one compiled shape; each
        sample's limit max_new_tokens), or in one static batch, prompts left-padded to
        task.max_prompt_len."""
        if engine == "continuous":
            n = slots or len(probs) * num_samples
            r = generate_slots(model, [p.prompt_ids for p in probs], params, num_samples, key=key,
                               slots=-(-n // s.shards) * s.shards, max_new_tokens=max_new_tokens,
                               prompt_width=task.max_prompt_len, kv_dtype=kv_dtype, record_routing=record)
            return r.rollout
        if max_new_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=max_new_tokens)
        ids, mask = left_pad([p.prompt_ids for p in probs], tok.pad_id, width=task.max_prompt_len)
        return fetch(generate(model, ids, params, num_samples=num_samples, key=key, prompt_mask=mask,
                              kv_dtype=kv_dtype, record_routing=record))

    def score(probs, r, num_samples):
        """Rewards of the samples of each problem (rows i*G ... i*G+G-1); failures print and score 0."""
        report = task.score_all(
            [tok.decode(p.prompt_ids) for p in probs for _ in range(num_samples)],
            [completion_text(tok, r.tokens[i, :r.lengths[i]]) for i in range(len(probs) * num_samples)],
            [p.answer for p in probs for _ in range(num_samples)], rl.reward_timeout_s)
        for msg in report.messages[:3]:
            bar.message(f"reward failure (scored 0): {msg}")
        return report

    def pass_at_1():
        """Held-out greedy pass@1: a completion passes when its reward is > 0."""
        return float(np.mean(np.asarray(score(task.eval_set, sample(task.eval_set, greedy), 1).scores) > 0))

    learner = RLLearner(model, rl_opt, rl, sample=lambda probs, n, key, window: sample(probs, s.sampling, n, key, window, rl.routing_replay),
                        score=score, problems=rl_it, width=width, max_new_tokens=task.max_new_tokens,
                        pad_id=tok.pad_id, key=jax.random.key(config.seed), windows=windows,
                        guard=guard, fetch=fetch)

    # ---------------------------------------------------------------- checkpoints (resume)
    ckpts = runs.RunCheckpoints(workdir, config.checkpoint.keep)
    start, meta = 0, {"eval_before": None, "sft_end": None if config.sft.steps else 0}
    restored = ckpts.restore(model=model, sft_opt=sft_opt, rl_opt=rl_opt)
    if restored is not None:
        start, meta = restored
        sft_it.set_state(meta["sft_data"])
        rl_it.set_state(meta["rl_data"])
        if windows:
            windows.restore(meta["length"])
        learner.key = jax.random.wrap_key_data(jnp.asarray(meta["key"], jnp.uint32))
        if "sft_end" not in meta:  # a checkpoint written before SFT could stop early
            meta["sft_end"] = config.sft.steps if start >= config.sft.steps else None
        print(f"resumed from checkpoint step {start}", flush=True)

    def total_steps():  # SFT's steps (all of them until it has ended) + RL's
        return (config.sft.steps if meta["sft_end"] is None else meta["sft_end"]) + rl.steps

    def save(step):
        meta.update(sft_data=sft_it.get_state(), rl_data=rl_it.get_state(), length=windows and windows.state(),
                    key=np.asarray(jax.random.key_data(learner.key)).tolist())
        ckpts.save(step, meta, model=model, sft_opt=sft_opt, rl_opt=rl_opt)

    bar = ProgressBar(total_steps(), start, every=config.log_every, stream=None if primary else io.StringIO())
    if primary:
        storage.prepare_dir(storage.join(workdir, "tb"))
        metrics = MetricsWriter(
            storage.open_append(storage.join(workdir, runs.METRICS_FILE)),
            EventFileWriter(storage.open_append(storage.join(workdir, "tb", event_file_name()), binary=True),
                            resume_step=start if start else None))
    else:
        metrics = MetricsWriter(io.StringIO())
    log = metrics.write

    try:
        t_start = time.perf_counter()
        step = start
        while step < total_steps():
            if meta["sft_end"] is None:  # ------------------------------------------------------ SFT
                ids, mask = sft_batch(next(sft_it), tok, width)
                m = fetch(sft_step(model, sft_opt, jnp.asarray(ids), jnp.asarray(mask)))
                last = step == config.sft.steps - 1
                if step % config.log_every == 0 or last or not m["finite"]:
                    log({"step": step, "phase": "sft", **m})
                guard(m["finite"], step)
                bar.update(step + 1, f"sft loss {float(m['sft_loss']):.3f}")
                if last or (s.stop_at is not None and (step + 1) % s.eval_every == 0):
                    p = pass_at_1()
                    log({"step": step, "phase": "eval", "pass_at_1": p})
                    # evaluations in a row at the threshold (in meta: a resumed run keeps counting)
                    meta["sft_streak"] = meta.get("sft_streak", 0) + 1 if s.stop_at is not None and p >= s.stop_at else 0
                    if last or meta["sft_streak"] >= s.stop_in_a_row:
                        meta.update(eval_before=p, sft_end=step + 1)
                        bar.total = total_steps()
                        bar.message(f"held-out pass@1 after SFT (before RL): {p:.3f}, SFT ended at step {step + 1}")
            else:  # -------------------------------------------------------------------------- RL
                t0 = time.perf_counter()
                rl_step = step - meta["sft_end"]
                task.begin_step(rl_it, rl_step)
                window = windows.window if windows else None  # this step's generation window
                collected = learner.collect(window)
                rec = {"step": step, "phase": "rl", **collected.metrics}
                if collected.batch is not None:
                    rec.update(learner.update(collected, step, rl_step, t0))
                rec.update(task.step_metrics(rl_step, collected.problems, collected.rewards, collected.lengths))
                if windows:
                    rec.setdefault("length/window", window)
                log(rec)
                bar.update(step + 1, f"rl reward {rec['reward_mean']:.3f} kept {rec['groups_kept']}")
            if (step + 1) % config.checkpoint.every == 0 or step + 1 == total_steps():
                save(step + 1)
            if config.get("crash_after_step") is not None and step + 1 == config.crash_after_step:
                ckpts.wait()
                raise SystemExit(f"crash_after_step={config.crash_after_step}: simulated crash (testing hook)")
            step += 1
    except BaseException:  # a crash (or the testing hook): what was logged is on disk
        metrics.close()
        raise
    finally:
        ckpts.close()  # waits for the last save
    after = pass_at_1()
    before = meta["eval_before"]
    result = {"pass_at_1_before_rl": before, "pass_at_1_after_rl": after,
              "gain_points": None if before is None else 100 * (after - before),
              "eval_size": len(task.eval_set), "wall_s": time.perf_counter() - t_start}
    log({"step": total_steps(), "phase": "eval", "pass_at_1": after})
    metrics.close()
    bar.message(f"held-out pass@1: {before} after SFT -> {after:.3f} after RL")
    if primary:
        storage.write_text(storage.join(workdir, runs.EVAL_FILE), json.dumps(result, indent=2))
        plot_reward_curve(workdir)
    return result


def load_init(path: str, cfg: ModelConfig, mesh) -> MiniMaxM1:
    """The weights of checkpoint ``path``, each placed in its sharding on ``mesh`` as it is read."""
    from m1jax.checkpoints import hf

    if mesh.size > 1:
        jax.set_mesh(mesh)  # as sharding.build_on_mesh: what follows runs sharded
    model = hf.load(path, mesh=mesh if mesh.size > 1 else None, **{k: getattr(cfg, k) for k in RUNTIME})
    assert model.cfg == cfg, (model.cfg, cfg)
    print(f"initialized from {path}", flush=True)
    return model


def plot_reward_curve(workdir: str) -> None:
    """workdir/reward_curve.png: the sampled reward of every RL step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no reward_curve.png)")
        return
    recs = [json.loads(line) for line in storage.read_text(storage.join(workdir, runs.METRICS_FILE)).splitlines()]
    rl = [r for r in recs if r.get("phase") == "rl"]
    if not rl:
        return
    fig = plt.figure(figsize=(5, 3))
    plt.plot([r["step"] for r in rl], [r["reward_mean"] for r in rl])
    plt.xlabel("step")
    plt.ylabel("mean reward (sampled, T=1)")
    plt.tight_layout()
    storage.save_figure(fig, storage.join(workdir, "reward_curve.png"))
