"""Curriculum schedule and grain mixture, staged length windows, and the CI-sized curriculum run."""

import json
import os
import string
import subprocess
import sys

import numpy as np
import pytest

from m1jax.envs.curriculum import Curriculum, Schedule
from m1jax.envs.length import LengthSchedule

CFG = dict(envs=dict(sort=dict(env="sort", args=dict(difficulty=1)), boolean=dict(env="boolean")),
           schedule=dict(steps=(0, 4), weights=dict(sort=(1.0, 0.5), boolean=(0.0, 0.5))),
           tokenizer="chars:" + string.printable, max_prompt_tokens=96, max_new_tokens=32, eval_size_per_env=3,
           eval_seed=7)


def test_schedule_linear_step_and_validation():
    s = Schedule(["a", "b"], (0, 4), {"a": (1.0, 0.5), "b": (0.0, 0.5)})
    np.testing.assert_allclose([s(0), s(2), s(4), s(100)], [[1, 0], [0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    s = Schedule(["a", "b"], (0, 4), {"a": (3.0, 1.0), "b": (1.0, 1.0)}, "step")  # normalized, held
    np.testing.assert_allclose([s(0), s(3), s(4)], [[0.75, 0.25], [0.75, 0.25], [0.5, 0.5]])
    with pytest.raises(ValueError, match="exactly the environments"):
        Schedule(["a", "b"], (0,), {"a": (1.0,)})
    with pytest.raises(ValueError, match="increasing"):
        Schedule(["a"], (3, 1), {"a": (1.0, 1.0)})
    with pytest.raises(ValueError, match="positive sum"):
        Schedule(["a", "b"], (0,), {"a": (0.0,), "b": (0.0,)})


def _envs_drawn(it, n):
    return [json.loads(next(it).answer)["env"] for _ in range(n)]


def test_mixture_follows_the_weights_and_resumes_exactly():
    c = Curriculum(CFG)
    it = c.rl_iterator(seed=1)
    it.set_step(0)
    assert set(_envs_drawn(it, 50)) == {"sort"}  # weight 0: never drawn
    it.set_step(4)
    share = np.mean([e == "sort" for e in _envs_drawn(it, 400)])
    assert abs(share - 0.5) < 0.08, share  # binomial sd 0.025
    state = it.get_state()
    ahead = [next(it).answer for _ in range(10)]
    fresh = c.rl_iterator(seed=1)
    fresh.set_state(json.loads(json.dumps(state)))  # the checkpoint stores it as JSON
    assert [next(fresh).answer for _ in range(10)] == ahead
    with pytest.raises(ValueError, match="unknown keys"):
        Curriculum({**CFG, "colour": 1})


def test_curriculum_reward_routes_to_each_environment_and_reports_per_env():
    c = Curriculum(CFG)
    probs = c.eval_set
    assert len(probs) == 6 and {json.loads(p.answer)["env"] for p in probs} == {"sort", "boolean"}
    sort_p = next(p for p in probs if json.loads(p.answer)["env"] == "sort")
    ref = json.loads(json.loads(sort_p.answer)["reference"])
    right = "\\boxed{" + ", ".join(map(str, ref)) + "}"
    assert c.reward("", right, sort_p.answer) == 1.0
    assert c.reward("", "\\boxed{True}", sort_p.answer) == 0.0  # held-out problems: correctness only
    rl_p = next(iter(c.rl_iterator(seed=0)))
    rl_ref = json.loads(json.loads(rl_p.answer)["reference"])
    assert c.reward("", "\\boxed{" + ", ".join(map(str, rl_ref)) + "}", rl_p.answer) == pytest.approx(1.1)
    assert c.reward("", "\\boxed{True}", rl_p.answer) == pytest.approx(0.1)  # RL: well-formed, wrong
    m = c.metrics([sort_p], [[1.1, 0.1]], [5, 7])
    assert m == {"env/sort/count": 2, "env/sort/reward_mean": pytest.approx(0.6), "env/sort/solved": 0.5,
                 "env/sort/response_len_mean": 6.0, "env/boolean/count": 0}
    sft = next(iter(c.stream(0).to_iter_dataset()))
    assert sft.answer.startswith("\\boxed{")  # SFT targets are known-correct solutions


def _length(**kw):
    return LengthSchedule({"windows": (8, 16, 24), "advance_at": (None, 5), "p99_frac": 0.9, "ppl_window": 3,
                           "ppl_tol": 0.05, **kw}, max_new_tokens=24)


def test_length_advances_on_both_signals_or_at_the_configured_step():
    ls = _length()
    lp = np.log(np.full(10, 0.5))  # generation perplexity 2.0, steady
    assert ls.update(0, [8] * 10, lp)["length/advanced"] == 0.0  # p99 at the window, ppl not yet known
    assert ls.update(1, [8] * 10, lp)["length/advanced"] == 0.0
    rec = ls.update(2, [8] * 10, lp)  # 3 steady steps: converged, and p99 = 8 >= 0.9 * 8
    assert rec["length/ppl_converged"] == 1.0 and rec["length/p99_near"] == 1.0 and rec["length/advanced"] == 1.0
    assert rec["length/window"] == 8 and ls.window == 16
    assert ls.update(3, [3] * 10, lp)["length/advanced"] == 0.0  # short responses: no signal
    rec = ls.update(4, [3] * 10, lp)  # after step 4 comes step 5, the configured advance
    assert rec["length/advanced"] == 1.0 and rec["length/advance_forced"] == 1.0 and ls.window == 24
    again = _length()
    again.restore(json.loads(json.dumps(ls.state())))
    assert again.window == 24
    noisy = _length()
    for step, p in enumerate((0.5, 0.3, 0.6, 0.2)):  # long but perplexity still moving: no advance
        assert noisy.update(step, [8] * 10, np.log(np.full(10, p)))["length/advanced"] == 0.0
    with pytest.raises(ValueError, match="max_new_tokens"):
        LengthSchedule({"windows": (8, 32), "advance_at": (None,), "p99_frac": 0.9, "ppl_window": 3,
                        "ppl_tol": 0.05}, max_new_tokens=24)
    with pytest.raises(ValueError, match="one entry"):
        _length(advance_at=(None,))


def test_length_stages_carry_their_clip_and_is_weight_cap():
    ls = _length(max_grad_norm=(1.0, 0.5, 0.25), is_weight_max=(5.0, 4.0, 3.0))
    assert ls.overrides() == {"max_grad_norm": 1.0, "is_weight_max": 5.0}
    ls.restore({"stage": 2, "ppl_history": []})
    assert ls.overrides() == {"max_grad_norm": 0.25, "is_weight_max": 3.0}
    assert _length().overrides() == {}
    with pytest.raises(ValueError, match="one value > 0 per window"):
        _length(max_grad_norm=(1.0, 0.5))
    # training refuses a stage clip the optimizer's own clip (after it) would override
    from m1jax import training
    from m1jax.configs import load_config_file

    config = load_config_file("configs/curriculum_tiny.py")
    config.length.max_grad_norm = (1.0, 2.0)
    with pytest.raises(ValueError, match="a stage can only lower the clip"):
        training.setup(config, "unused")


def test_ci_sized_curriculum_run_changes_weights_and_window(tmp_path):
    """train.py with two environments and two windows: metrics.jsonl shows both changing."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it
    res = subprocess.run([sys.executable, "train.py", "--config=configs/curriculum_tiny.py", f"--workdir={tmp_path}",
                          "--config.sft.steps=2", "--config.rl.steps=5", "--config.rl.dynamic_sampling=False",
                          "--config.curriculum.eval_size_per_env=4", "--config.rl.prompts_per_step=4",
                          "--config.length.ppl_tol=1e-9"],  # only the configured step (3) can advance the window
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in rl if m["phase"] == "rl"]
    assert len(rl) == 5
    np.testing.assert_allclose([m["curriculum/weight/boolean"] for m in rl], [0.0, 0.125, 0.25, 0.375, 0.5])
    assert [m["length/window"] for m in rl] == [16, 16, 16, 24, 24]
    # the stage of each step's samples sets its clip and IS-weight cap (configs/curriculum_tiny.py)
    assert [m["length/max_grad_norm"] for m in rl] == [1.0, 1.0, 1.0, 0.5, 0.5]
    assert [m["length/is_weight_max"] for m in rl] == [5.0, 5.0, 5.0, 3.0, 3.0]
    assert rl[2]["length/advanced"] == 1.0 and rl[2]["length/advance_forced"] == 1.0
    assert all("length/gen_ppl" in m and "length/p99_frac_of_window" in m for m in rl)
    assert rl[0]["env/boolean/count"] == 0 and rl[-1]["env/boolean/count"] > 0
    assert all("genrm/reward_length_corr" in m and m["genrm/length_bias_flag"] == 0.0 for m in rl)
    assert max(m["response_len_p99"] for m in rl[:3]) <= 16 < max(m["response_len_p99"] for m in rl[3:])
