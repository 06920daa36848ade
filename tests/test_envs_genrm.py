"""Generative reward model: double judging with swapped positions, grades, the m1jax-model judge,
and the length-bias monitor."""

import json

import numpy as np
import pytest

from m1jax.envs.genrm import LengthBiasMonitor, ModelJudge, grade, pairwise


def _fair_judge(prompts):
    """Prefers the response that contains 'right' (wherever it is shown)."""
    out = []
    for p in prompts:
        a = p.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = p.split("Response B:\n")[1].split("\n\nWhich")[0]
        out.append("\\boxed{A}" if "right" in a and "right" not in b else
                   "\\boxed{B}" if "right" in b and "right" not in a else "\\boxed{tie}")
    return out


def test_pairwise_scores_and_position_swap():
    q, ref = ["q1", "q2", "q3"], ["right ref", "wrong ref", "right ref"]
    scores, bad = pairwise(_fair_judge, q, ["wrong", "right", "right too"], ref)
    assert scores == [-1, 1, 0] and bad == 0
    always_a = lambda prompts: ["\\boxed{A}"] * len(prompts)  # noqa: E731 -- pure position bias
    assert pairwise(always_a, q, ["x", "y", "z"], ref) == ([0, 0, 0], 0)
    junk = lambda prompts: ["no verdict"] * len(prompts)  # noqa: E731
    assert pairwise(junk, q, ["x", "y", "z"], ref) == ([0, 0, 0], 6)


def test_grade_is_averaged_over_both_orders():
    def judge(prompts):  # grades 5 when the reference comes first, 3 when the response does
        return ["\\boxed{5}" if p.index("Reference answer") < p.index("Response:") else "\\boxed{3}" for p in prompts]

    scores, bad = grade(judge, ["q"], ["r"], ["ref"])
    assert scores == [pytest.approx(0.75)] and bad == 0  # mean grade 4 -> (4 - 1) / 4
    assert grade(lambda p: ["\\boxed{9}"] * len(p), ["q"], ["r"], ["ref"]) == ([0.0], 2)


def test_model_judge_runs_an_m1jax_model_with_the_rollout_engine():
    import string

    from flax import nnx

    from m1jax import tokenizer as tokenizers
    from m1jax.model import MiniMaxM1
    from m1jax.model.config import ModelConfig

    tok = tokenizers.load("chars:" + string.printable)
    cfg = ModelConfig.from_dict(dict(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                     num_kv_heads=1, head_dim=16, layer_types=("linear_attention", "full_attention"),
                                     num_experts=2, num_experts_per_tok=1, intermediate_size=32, rotary_dim=16,
                                     block_size=16, max_position_embeddings=512))
    judge = ModelJudge(MiniMaxM1(cfg, rngs=nnx.Rngs(0)), tok, max_new_tokens=4)
    verdicts = judge(["short?", "a longer judge prompt?"])
    assert len(verdicts) == 2 and all(isinstance(v, str) for v in verdicts)
    scores, bad = pairwise(judge, ["q"], ["r"], ["ref"])  # a random model: unreadable -> no preference
    assert scores == [0] and bad == 2


def test_length_bias_monitor_flags_reward_growing_with_length_not_success():
    rng = np.random.default_rng(0)
    hacked, honest = LengthBiasMonitor(window=5), LengthBiasMonitor(window=5)
    for step in range(5):
        lengths = 10 + 5 * step + rng.integers(0, 3, 16)
        rec = hacked.update(0.1 * step + lengths / 100, lengths, np.full(16, 0.3))  # success flat
        rec2 = honest.update(0.1 * step + lengths / 100, lengths, np.full(16, 0.3 + 0.1 * step))
    assert rec["genrm/length_bias_flag"] == 1.0 and rec["genrm/reward_length_corr"] > 0.5
    assert rec2["genrm/length_bias_flag"] == 0.0  # success grows with reward: no flag
    with pytest.raises(ValueError, match="window"):
        LengthBiasMonitor(window=2)


# ---------------------------------------------------------------------------- genrm as a reward source
CHARS = __import__("string").printable


def _bigram_judge(path, verdict: str):
    """Save, as a train.py-style run at ``path``, an m1jax model built by hand to answer ``verdict``
    to any judge prompt: one-hot embeddings, every mixer's and expert's output projection zero (so
    each position only sees its own token) and an LM head mapping each character to the next one
    of ``verdict`` + eos (any other character starts it). Greedy decoding through the real rollout
    engine then writes exactly ``verdict``."""
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.checkpoints import runs
    from m1jax import tokenizer as tokenizers
    from m1jax.model import MiniMaxM1
    from m1jax.model.config import ModelConfig

    tok = tokenizers.load("chars:" + CHARS)
    cfg = ModelConfig.from_dict(dict(vocab_size=tok.vocab_size, hidden_size=128, num_layers=2, num_heads=2,
                                     num_kv_heads=1, head_dim=16, layer_types=("linear_attention", "full_attention"),
                                     num_experts=2, num_experts_per_tok=1, intermediate_size=32, rotary_dim=16,
                                     block_size=16, max_position_embeddings=1024))
    model = MiniMaxM1(cfg, rngs=nnx.Rngs(0))
    ids = tok.encode(verdict)
    assert len(set(ids)) == len(ids)
    nxt = np.full(tok.vocab_size, ids[0])
    nxt[ids] = ids[1:] + [tok.eos_id]
    state = nnx.state(model, nnx.Param)
    for path_, var in nnx.to_flat_state(state):
        if path_[-1] in ("out", "o", "w2"):
            var.set_value(jnp.zeros_like(var.get_value()))
    nnx.update(model, state)
    model.embed.set_value(jnp.eye(tok.vocab_size, 128))
    model.lm_head.set_value(jnp.zeros((128, tok.vocab_size)).at[np.arange(tok.vocab_size), nxt].set(1.0))
    runs.save_model(str(path), model, 0)
    return tok


def test_genrm_env_scores_with_a_judge_checkpoint(tmp_path):
    """grade: a judge that always says 5 gives reward 1; pairwise: a judge that always prefers A is
    cancelled by the position swap (score 0 -> reward 0.5); a judge prompt that is too long or that
    its tokenizer cannot encode is unreadable, without failing the others."""
    from m1jax.envs import make_env

    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "Capital of France?", "reference": "Paris"}\n')
    _bigram_judge(tmp_path / "grader", "\\boxed{5}")
    _bigram_judge(tmp_path / "pairwise", "\\boxed{A}")
    spec = "chars:" + CHARS
    grader = make_env("genrm", data=str(data), judge=str(tmp_path / "grader"), judge_tokenizer=spec)
    ex = grader.example(0, 0)
    assert ex.prompt == "Capital of France?"
    assert grader.judge([grader.judge.tokenizer.decode([5, 6, 7])]) == ["\\boxed{5}"]
    assert [s.reward for s in grader.score_batch(["Paris", "Lyon"], [ex.reference] * 2)] == [1.0, 1.0]
    pair = make_env("genrm", data=str(data), judge=str(tmp_path / "pairwise"), judge_tokenizer=spec, mode="pairwise")
    assert [s.reward for s in pair.score_batch(["Paris", "Lyon"], [ex.reference] * 2)] == [0.5, 0.5]
    short = make_env("genrm", data=str(data), judge=str(tmp_path / "grader"), judge_tokenizer=spec,
                     judge_max_prompt_tokens=50)
    assert [s.reward for s in short.score_batch(["Paris"], [ex.reference])] == [0.0]  # grade 1 twice
    assert short.judge.rejected == 2
    assert [s.reward for s in grader.score_batch(["Par…"], [ex.reference])] == [0.0]  # "…" is not in its alphabet
    assert grader.judge.rejected == 2
    with pytest.raises(ValueError, match="judge_tokenizer"):
        make_env("genrm", data=str(data), judge=str(tmp_path / "grader"))
    with pytest.raises(ValueError, match="'grade' or 'pairwise'"):
        make_env("genrm", data=str(data), judge=str(tmp_path / "grader"), judge_tokenizer=spec, mode="vote")


def test_train_py_with_a_genrm_environment_in_the_curriculum(tmp_path):
    """train.py composes a rule-based environment and a judge-scored one from config: the judge
    checkpoint scores the general-task samples in metrics.jsonl."""
    import os
    import subprocess
    import sys

    _bigram_judge(tmp_path / "judge", "\\boxed{5}")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(f'{{"prompt": "Say {w}.", "reference": "{w}", "solution": "{w}"}}\n'
                            for w in ("yes", "no", "maybe", "ok")))
    config = tmp_path / "genrm_config.py"
    config.write_text(f"""
from configs import curriculum_tiny

def get_config():
    c = curriculum_tiny.get_config()
    c.curriculum.envs = dict(sort=dict(env="sort", args=dict(difficulty=1)),
                             qa=dict(env="genrm", args=dict(data={str(data)!r}, judge={str(tmp_path / 'judge')!r},
                                                            judge_tokenizer=c.curriculum.tokenizer,
                                                            judge_max_prompt_tokens=384)))
    c.curriculum.schedule = dict(steps=(0,), weights=dict(sort=(0.5,), qa=(0.5,)))
    c.curriculum.eval_size_per_env = 2
    c.length = None
    return c
""")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "train.py", f"--config={config}", f"--workdir={tmp_path / 'run'}",
                          "--config.sft.steps=2", "--config.rl.steps=2", "--config.rl.dynamic_sampling=False",
                          "--config.rl.prompts_per_step=4"], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in rl if m["phase"] == "rl"]
    assert len(rl) == 2 and sum(m["env/qa/count"] for m in rl) > 0
    qa = [m for m in rl if m["env/qa/count"]]
    # every finished completion gets grade 5 twice (reward 1); a cut one ends in "…", which the judge's
    # alphabet lacks: unreadable, reward 0. So the rewards are 0 or 1 and some are 1.
    assert all(m["env/qa/reward_mean"] == m["env/qa/solved"] for m in qa)
    assert sum(m["env/qa/reward_mean"] for m in qa) > 0
    assert all(m["reward_failures"] == 0 for m in rl)
