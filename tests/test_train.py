"""train.py end to end (CI-sized): runs, writes eval.json/metrics/TensorBoard events, resumes
bit-exactly, trains on JSONL prompts with math-verify and user rewards, stops on non-finite updates.

Runs that check the training itself call m1jax.training in this process (``train_here``); the ones
that check the command line, the plain install, one real device or a mesh run train.py."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.lean import lean_env

# train.py as a user runs it: one CPU device (not the 8 fake devices conftest sets for mesh tests,
# which change XLA's CPU numerics and so the trajectory).
# On the plain install (tests/lean.py): the main job needs no torch, transformers or test tools.
ENV = lean_env({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})

SMALL = ["--config=configs/arith_cispo.py", "--config.sft.steps=6", "--config.rl.steps=4", "--config.log_every=1",
         "--config.checkpoint.every=5", "--config.data.eval_size=16", "--config.sft.batch_size=16",
         "--config.rl.prompts_per_step=8", "--config.rl.samples_per_prompt=4", "--config.rl.dynamic_sampling=False"]


def run(workdir, *extra):
    return subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *SMALL, *extra],
                          capture_output=True, text=True, timeout=600, env=ENV)


def train_here(workdir, *extra, base="configs/arith_cispo.py"):
    """train.py's run in this process (``training.setup`` + ``train_and_evaluate``), with SMALL and
    ``extra`` as --config.KEY=VALUE overrides: compiled programs are shared between the runs of a test."""
    import ast

    from m1jax import training
    from m1jax.configs import load_config_file

    config = load_config_file(base)
    for flag in [*SMALL[1:], *extra]:
        key, value = flag.removeprefix("--config.").split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a string
        config.update_from_flattened_dict({key: value})
    return training.train_and_evaluate(training.setup(config, str(workdir)))


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(workdir):
    """{tag: [(step, value)]} as TensorBoard reads workdir/tb."""
    acc = EventAccumulator(str(workdir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_as_scalars(workdir):
    """The same from metrics.jsonl: every numeric value as phase/name, the last line of a step winning
    (a resumed run recomputes the steps after its checkpoint), in float32 as TensorBoard stores it."""
    latest = {}
    for rec in metrics(workdir):
        for k, v in rec.items():
            if k not in ("step", "phase") and isinstance(v, (int, float)):
                latest[(f"{rec['phase']}/{k}", rec["step"])] = float(np.float32(v))
    out = {}
    for (tag, step), v in sorted(latest.items()):
        out.setdefault(tag, []).append((step, v))
    return out


ISSUE_METRICS = {"reward_mean", "pass_rate", "response_len_p50", "response_len_p99", "entropy", "is_weight_mean",
                 "is_ratio_p99", "is_clipped_frac", "grad_norm", "logprob_corr", "tokens_per_s"}


def test_resume_after_crash_is_bit_exact(tmp_path, capsys):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_here(full)
    result = json.loads((full / "eval.json").read_text())
    assert set(result) >= {"pass_at_1_before_rl", "pass_at_1_after_rl"}
    with pytest.raises(SystemExit, match="simulated crash"):
        train_here(crashed, "--config.crash_after_step=7")  # checkpoint at 5, crash after step 7
    capsys.readouterr()
    train_here(crashed)  # same run again: resumes from step 5
    assert "resumed from checkpoint step 5" in capsys.readouterr().out
    ref = {(m["phase"], m["step"]): m for m in metrics(full)}
    after = [m for m in metrics(crashed) if m["step"] >= 5][-5:]  # the resumed run's steps 5..9
    keys = {"sft": "sft_loss", "rl": "loss"}
    compared = 0
    for m in after:
        if m["phase"] in keys and keys[m["phase"]] in m:
            assert m[keys[m["phase"]]] == ref[(m["phase"], m["step"])][keys[m["phase"]]], m
            compared += 1
    assert compared >= 3
    assert all(ISSUE_METRICS <= set(m) for m in metrics(full) if m["phase"] == "rl")
    # TensorBoard holds exactly the metrics.jsonl scalars (the crashed run's steps 5..7 replaced).
    nan_free = lambda d: {t: [(s, v) for s, v in pts if v == v] for t, pts in d.items()}  # noqa: E731
    for workdir in (full, crashed):
        assert nan_free(tensorboard_scalars(workdir)) == nan_free(jsonl_as_scalars(workdir))
    assert tensorboard_scalars(crashed)["rl/loss"] == tensorboard_scalars(full)["rl/loss"]


ALWAYS_RIGHT = """
def always_right(prompt, completion, reference):
    return 1.0
"""


def test_sft_stops_at_the_pass_at_1_threshold_and_resumes_after_it(tmp_path, capsys):
    """sft.stop_at_pass_at_1: SFT ends at the first held-out evaluation that reaches it (here the
    first, at step 3, since every completion is scored right), RL runs its rl.steps from there, and
    a run that crashes during RL resumes with the same SFT end."""
    (tmp_path / "r.py").write_text(ALWAYS_RIGHT)
    args = ["--config.sft.steps=40", "--config.sft.eval_every=3", "--config.sft.stop_at_pass_at_1=0.5",
            "--config.sft.stop_evals_in_a_row=1", f"--config.rl.reward={tmp_path / 'r.py'}:always_right"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_here(full, *args)
    assert "SFT ended at step 3" in capsys.readouterr().out
    ms = metrics(full)
    assert [m["step"] for m in ms if m["phase"] == "sft"] == [0, 1, 2]
    assert [m["step"] for m in ms if m["phase"] == "rl"] == [3, 4, 5, 6]
    assert all(m["repetition_frac"] == 0 for m in ms if m["phase"] == "rl")  # no early truncation in the toy
    assert json.loads((full / "eval.json").read_text())["pass_at_1_before_rl"] == 1.0
    with pytest.raises(SystemExit, match="simulated crash"):
        train_here(crashed, *args, "--config.crash_after_step=6")  # checkpoint after 5 steps, crash after 6
    capsys.readouterr()
    train_here(crashed, *args)
    assert "resumed from checkpoint step 5" in capsys.readouterr().out
    assert [m["step"] for m in metrics(crashed) if m["phase"] == "rl"] == [3, 4, 5, 5, 6]  # step 5 redone
    ref = {m["step"]: m["loss"] for m in ms if m["phase"] == "rl"}
    assert all(m["loss"] == ref[m["step"]] for m in metrics(crashed) if m["phase"] == "rl")
    for bad in ("--config.sft.stop_at_pass_at_1=1.5", "--config.sft.stop_evals_in_a_row=0"):
        with pytest.raises(ValueError, match=bad.removeprefix("--config.sft.")):
            train_here(tmp_path / "bad", bad)
        assert not (tmp_path / "bad").exists()  # refused before anything is written


RIGHT_BUT_AT_THE_SECOND_EVAL = """
import itertools
_calls = itertools.count()


def right_but_at_the_second_eval(prompt, completion, reference):
    return float(next(_calls) // 16 != 1)  # each SFT eval scores the 16 held-out problems
"""


def test_sft_stops_after_evals_in_a_row_at_the_threshold(tmp_path, capsys):
    """sft.stop_evals_in_a_row=2: SFT ends at the second evaluation in a row that reaches
    stop_at_pass_at_1. The evaluations at steps 3, 6, 9, 12 score 1, 0, 1, 1: the miss at step 6
    resets the count, so SFT ends at step 12 (not at 6, nor at 9)."""
    (tmp_path / "r.py").write_text(RIGHT_BUT_AT_THE_SECOND_EVAL)
    train_here(tmp_path / "run", "--config.sft.steps=40", "--config.sft.eval_every=3",
               "--config.sft.stop_at_pass_at_1=0.5", "--config.sft.stop_evals_in_a_row=2", "--config.rl.steps=1",
               f"--config.rl.reward={tmp_path / 'r.py'}:right_but_at_the_second_eval")
    assert "SFT ended at step 12" in capsys.readouterr().out
    evals = [m["pass_at_1"] for m in metrics(tmp_path / "run") if m["phase"] == "eval"]
    assert evals[:4] == [1.0, 0.0, 1.0, 1.0], evals


def test_rl_rollouts_are_truncated_early_by_repetition(tmp_path):
    """rl.repetition_window / rl.repetition_prob reach the RL sampler: with a probability bound every
    token passes (1e-9), every sample that has not stopped by its 2nd token ends there by repetition."""
    train_here(tmp_path, "--config.sft.steps=2", "--config.rl.steps=2", "--config.rl.repetition_window=2",
               "--config.rl.repetition_prob=1e-9")
    rl = [m for m in metrics(tmp_path) if m["phase"] == "rl"]
    assert len(rl) == 2
    for m in rl:
        assert m["repetition_frac"] > 0.5 and m["response_len_p99"] <= 2, m
    with pytest.raises(ValueError, match="rl.repetition_prob=1.5"):
        train_here(tmp_path / "bad", "--config.rl.repetition_prob=1.5")


def test_recomputed_old_logp_with_tis_and_overlong_penalty(tmp_path):
    """pi_old recomputed by the trainer before the updates, under a sampler that differs from it (bf16
    KV caches): with one update per rollout r = pi_theta / pi_old is 1 at every token up to float32
    rounding (pi_old is the trainer's own forward of the same parameters; measured p99(r) - 1 <= 2.4e-7,
    while the sampler's log-probs as pi_old give 5e-6 to 8e-6 here), and the TIS factor
    min(pi_old / pi_sampler, 1) is logged (its formula: tests/test_cispo.py). With routing replay on
    (the sampler's experts in both the pi_old forward and the updates: tests/test_rl_steps.py)."""
    train_here(tmp_path, "--config.rl.old_logp=recomputed", "--config.rl.tis_cap=1.0", "--config.rl.routing_replay=True",
               "--config.rollout.kv_dtype=bfloat16", "--config.rl.updates_per_rollout=1", "--config.rl.minibatches=1",
               "--config.rl.overlong_cache_len=2", "--config.checkpoint.every=100")
    rl = [m for m in metrics(tmp_path) if m["phase"] == "rl"]
    assert len(rl) == 4
    for m in rl:
        assert abs(m["is_ratio_p99"] - 1) < 1e-6, m  # pi_old = pi_theta, to a few float32 ulps
        assert 0.999 < m["tis_weight_mean"] <= 1 + 1e-6, m  # capped at 1; the bf16 sampler is close
    with pytest.raises(ValueError, match="count twice"):  # TIS on top of sampler pi_old: refused
        train_here(tmp_path / "bad", "--config.rl.tis_cap=2.0")


REWARD_FN = """
import itertools, time
from m1jax.data import rewards

_calls = itertools.count()
_math_verify = rewards.get("math_verify")


def flaky_math(prompt, completion, reference):
    n = next(_calls)  # calls 0-7: the eval after SFT (8 problems); 8-15: the first RL step
    if n == 10:
        raise RuntimeError("flaky reward")
    if n == 12:
        time.sleep(5)  # past rl.reward_timeout_s
    return _math_verify(prompt, completion, reference)
"""


def test_jsonl_math_task_with_math_verify_and_a_failing_user_reward(tmp_path):
    """Prompts from JSONL (variable lengths, char tokenizer), rewards by a user function given as
    file.py:function that delegates to math-verify: the held-out references are written 14/2,
    \\frac{21}{3}, 7.0, ... while the model learns to answer "7", so only math-verify's equivalence
    scores them; one call raises and one hangs, both score 0 and are counted, and training goes on."""
    rng = np.random.default_rng(0)
    forms = ["What is {a}+{b}?", "{a}+{b}=", "Compute {a} plus {b}."]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": forms[i % 3].format(a=a, b=7 - a), "answer": 7}) + "\n"
                             for i, a in enumerate(rng.integers(0, 8, 40))))
    refs = ["14/2", "\\frac{21}{3}", "7.0", "$7$", "28/4", "\\frac{70}{10}", "7.00", "35/5"]
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"What is {i}+{7 - i}?", "answer": r}) + "\n"
                                for i, r in enumerate(refs)))
    (tmp_path / "my_reward.py").write_text(REWARD_FN)
    res = subprocess.run(
        [sys.executable, "train.py", f"--workdir={tmp_path / 'run'}", "--config=configs/math_jsonl.py",
         f"--config.data.path={train}", f"--config.data.eval_path={held_out}", "--config.data.eval_size=8",
         "--config.data.max_prompt_tokens=24", "--config.data.max_new_tokens=4", "--config.sft.steps=30",
         "--config.sft.batch_size=16", "--config.sft.eval_every=25",
         "--config.sft.stop_evals_in_a_row=1", "--config.rl.steps=2", "--config.rl.prompts_per_step=4",
         "--config.rl.samples_per_prompt=2", "--config.rl.dynamic_sampling=False", "--config.log_every=10",
         f"--config.rl.reward={tmp_path / 'my_reward.py'}:flaky_math", "--config.rl.reward_timeout_s=2"],
        capture_output=True, text=True, timeout=900, env=lean_env(ENV, allow=("math_verify",)))  # the .[math] extra
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reward raised RuntimeError: flaky reward" in res.stdout and "timed out after 2.0s" in res.stdout
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["pass_at_1_before_rl"] > 0.5, result  # exact string match would score 0 on every one
    rl = [m for m in metrics(tmp_path / "run") if m["phase"] == "rl"]
    assert [m["reward_failures"] for m in rl] == [2, 0]
    assert max(m["reward_mean"] for m in rl) > 0 and all(ISSUE_METRICS <= set(m) for m in rl)


def test_non_finite_updates_stop_the_run_after_k_in_a_row(tmp_path):
    """A learning rate of 1e38 turns the parameters non-finite after one update; the following
    updates are skipped (the loss stays put) and the run stops with a clear error after K = 2."""
    with pytest.raises(FloatingPointError, match="2 non-finite updates in a row at step 2"):
        train_here(tmp_path, "--config.sft_optim.learning_rate=1e38", "--config.sft_optim.warmup_steps=0",
                   "--config.max_nonfinite_in_a_row=2")
    sft = [m for m in metrics(tmp_path) if m["phase"] == "sft"]
    assert [m["finite"] for m in sft] == [True, False, False]
    assert sft[1]["sft_loss"] == sft[2]["sft_loss"]  # the skipped update left the parameters unchanged


def test_train_on_a_mesh_matches_one_device_and_resumes(tmp_path):
    """config.mesh: SFT and CISPO steps on (data=2, expert=2, tensor=2) over 8 fake CPU devices, sampling
    on the same mesh and parameters, equal one device's losses; a crash resumes onto the mesh."""
    args = ["--config.sft.steps=3", "--config.rl.steps=2", "--config.checkpoint.every=2"]
    mesh = ["--config.mesh.data=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"]
    env8 = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    res = run(tmp_path / "one", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    crashed = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'mesh'}", *SMALL, *args, *mesh,
                              "--config.crash_after_step=3"], capture_output=True, text=True, timeout=600, env=env8)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr + crashed.stdout
    assert "mesh data=2 expert=2 tensor=2: 8 of 8 devices" in crashed.stdout
    held = [float(x) for x in re.search(r"parameters: ([\d.]+) MiB, ([\d.]+) MiB on device 0", crashed.stdout).groups()]
    assert held[1] < held[0] / 2, held  # experts split over expert, MLP and heads over tensor
    res = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'mesh'}", *SMALL, *args, *mesh],
                         capture_output=True, text=True, timeout=600, env=env8)
    assert res.returncode == 0 and "resumed from checkpoint step 2" in res.stdout, res.stderr[-3000:]
    one, on_mesh = ({(m["step"], m["phase"]): m for m in metrics(tmp_path / d)} for d in ("one", "mesh"))
    assert one.keys() == on_mesh.keys()
    for key, m in one.items():
        for name in ("sft_loss", "loss", "grad_norm", "reward_mean", "is_weight_mean"):
            if name in m:
                np.testing.assert_allclose(on_mesh[key][name], m[name], rtol=1e-5, atol=1e-8, err_msg=f"{key} {name}")
    # a mesh the batch or the experts do not fit fails at startup, naming the setting
    for flags, msg in [(["--config.mesh.expert=3", "--config.mesh.data=-1"], "take 3 devices, which does not divide"),
                       (["--config.mesh.expert=8"], "mesh.expert=8 does not divide model.num_experts=4"),
                       (["--config.mesh.data=8", "--config.sft.batch_size=12"],
                        "sft.batch_size = 12 rows, not a multiple")]:
        with pytest.raises(ValueError, match=re.escape(msg)):  # in this process: conftest's 8 devices
            train_here(tmp_path / "bad", *flags)


def test_a_fresh_run_starts_from_init_from(tmp_path, capsys):
    """init_from: the run's model is a MiniMax checkpoint's (here one whose LM head is zero, so the first
    SFT loss is ln(vocab) exactly); a checkpoint of another shape or a missing one is refused before
    anything is written."""
    from flax import nnx

    from m1jax.checkpoints import hf
    from m1jax.configs import load_config_file, model_config
    from m1jax.model import MiniMaxM1

    cfg = model_config(load_config_file("configs/arith_cispo.py"))
    model = MiniMaxM1(cfg, rngs=nnx.Rngs(5))
    model.lm_head.set_value(np.zeros(model.lm_head.shape, np.float32))
    hf.save(model, str(tmp_path / "ckpt"))
    train_here(tmp_path / "run", f"--config.init_from={tmp_path / 'ckpt'}", "--config.sft.steps=1", "--config.rl.steps=0")
    assert f"initialized from {tmp_path / 'ckpt'}" in capsys.readouterr().out
    first = [m for m in metrics(tmp_path / "run") if m["phase"] == "sft"][0]
    assert first["sft_loss"] == pytest.approx(np.log(cfg.vocab_size), rel=1e-6)
    with pytest.raises(ValueError, match="its config.json has hidden_size=128, the config's model.hidden_size=64"):
        train_here(tmp_path / "bad", f"--config.init_from={tmp_path / 'ckpt'}", "--config.model.hidden_size=64")
    with pytest.raises(FileNotFoundError, match="init_from=.*nope: no such directory"):
        train_here(tmp_path / "bad", f"--config.init_from={tmp_path / 'nope'}")
    assert not (tmp_path / "bad").exists()
