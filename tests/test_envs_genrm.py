"""Generative reward model: double judging with swapped positions, grades, the m1jax-model judge,
and the length-bias monitor."""

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
