"""The RL learner's collection (DAPO dynamic sampling, overlong penalty, the batch it hands to the
updates) with a scripted sampler and reward, and RLConfig's checks; no model needed."""

import types

import jax
import numpy as np
import pytest

from m1jax.data.problem import Problem
from m1jax.data.rewards import ScoreReport
from m1jax.model.config import ConfigError
from m1jax.rl import RLConfig, RLLearner
from m1jax.rollout.engine import REPETITION, STOP


def scripted(rewards_per_batch, lengths=None, m=3):
    """A sampler and a reward: generation batch b of P problems x G samples scores rewards_per_batch[b]
    ([P, G]) and has completions of ``lengths`` tokens (default: all m); every 4th sample of a batch
    ends by repetition, the others at a stop token."""
    calls = {"sample": [], "batch": 0}

    def sample(probs, g, key, window):
        calls["sample"].append((len(probs), g, window))
        n = len(probs) * g
        ln = np.full(n, m) if lengths is None else np.asarray(lengths[calls["batch"]])
        tokens = np.arange(n * m).reshape(n, m) % 7 + 3
        return types.SimpleNamespace(tokens=tokens, logprobs=-np.ones((n, m), np.float32) / 10, lengths=ln,
                                     finish_reason=np.where(np.arange(n) % 4 == 0, REPETITION, STOP))

    def score(probs, r, g):
        scores = np.asarray(rewards_per_batch[calls["batch"]], float).reshape(-1)
        calls["batch"] += 1
        return ScoreReport(list(scores), errors=1)

    return sample, score, calls


def learner(cfg, sample, score, max_new_tokens=3):
    problems = iter([Problem([1, 2, i % 5 + 3], str(i)) for i in range(100)])
    return RLLearner(None, None, cfg, sample=sample, score=score, problems=problems, width=8,
                     max_new_tokens=max_new_tokens, pad_id=0, key=jax.random.key(0))


def test_dynamic_sampling_keeps_groups_with_signal_until_enough():
    cfg = RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, max_gen_batches=3)
    # batch 0: group 0 all right (no signal), group 1 split; batch 1: group 0 split, group 1 all wrong
    sample, score, calls = scripted([[[1, 1], [0, 1]], [[1, 0], [0, 0]]])
    out = learner(cfg, sample, score).collect()
    assert out.metrics["gen_batches"] == 2 and out.metrics["groups_kept"] == 2
    assert out.metrics["reward_failures"] == 2  # one error counted per scoring call
    assert out.metrics["repetition_frac"] == 2 / 8  # of every sampled row, kept or not
    assert out.metrics["reward_mean"] == pytest.approx(4 / 8) and out.metrics["pass_rate"] == pytest.approx(4 / 8)
    assert out.rewards.shape == (4, 2) and len(out.problems) == 4 and out.lengths.shape == (8,)
    np.testing.assert_allclose(out.advantages, [-1, 1, 1, -1], atol=1e-5)  # population std per group
    ids, comp, logp = out.batch
    assert ids.shape == (4, 8) and comp.shape == logp.shape == (4, 7)
    assert comp.sum() == 4 * 3 and np.allclose(logp[comp], -0.1) and (logp[~comp] == 0).all()
    assert [c[2] for c in calls["sample"]] == [None, None]  # no window: the task's limit


def test_without_signal_the_step_has_no_batch_and_stops_at_max_gen_batches():
    cfg = RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, max_gen_batches=3)
    sample, score, calls = scripted([[[1, 1], [0, 0]]] * 3)
    out = learner(cfg, sample, score).collect()
    assert out.metrics["gen_batches"] == 3 and out.metrics["groups_kept"] == 0 and out.batch is None
    # dynamic sampling off: every group is kept, after one generation batch
    sample, score, _ = scripted([[[1, 1], [0, 0]]])
    out = learner(RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, dynamic_sampling=False),
                  sample, score).collect()
    assert out.metrics["gen_batches"] == 1 and out.batch is not None
    np.testing.assert_array_equal(out.advantages, 0)


def test_gen_prompts_oversamples_one_batch_and_trains_on_the_first_kept_groups():
    cfg = RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, gen_prompts=4)
    # one batch of 4 problems: groups 0, 2 and 3 have signal; the step trains on groups 0 and 2
    sample, score, calls = scripted([[[1, 0], [1, 1], [0, 1], [1, 0]]])
    out = learner(cfg, sample, score).collect()
    assert calls["sample"] == [(4, 2, None)]
    assert out.metrics["gen_batches"] == 1 and out.metrics["groups_kept"] == 3
    assert out.rewards.shape == (4, 2) and out.batch.ids.shape[0] == 4  # 2 groups x G rows
    np.testing.assert_allclose(out.advantages, [1, -1, -1, 1], atol=1e-5)
    ids = out.batch.ids
    assert ids[0, 2] == 3 and ids[2, 2] == 5  # problems 0 and 2 (prompt [1, 2, i % 5 + 3])
    # without dynamic sampling every group is kept: a batch draws prompts_per_step problems
    sample, score, calls = scripted([[[1, 1], [0, 0]]])
    learner(RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, gen_prompts=4, dynamic_sampling=False),
            sample, score).collect()
    assert calls["sample"] == [(2, 2, None)]


def test_overlong_penalty_uses_the_window_and_each_batch_gets_a_fresh_key():
    cfg = RLConfig(prompts_per_step=1, samples_per_prompt=2, minibatches=1, dynamic_sampling=False,
                   overlong_cache_len=2)
    sample, score, calls = scripted([[[1, 1]]], lengths=[[1, 4]], m=4)
    lrn = learner(cfg, sample, score, max_new_tokens=4)
    key = lrn.key
    out = lrn.collect(window=4)
    # lengths 1 and 4 of window 4, cache 2: no penalty, then -1 at the limit
    np.testing.assert_allclose(out.rewards, [[1.0, 0.0]])
    assert calls["sample"] == [(1, 2, 4)]
    assert not np.array_equal(jax.random.key_data(lrn.key), jax.random.key_data(key))


@pytest.mark.parametrize("kw, msg", [
    (dict(tis_cap=2.0), "count twice"),
    (dict(loss="ppo"), "rl.loss='ppo'"),
    (dict(minibatches=3), "must divide rl.prompts_per_step=32"),
    (dict(repetition_window=-1), "rl.repetition_window=-1"),
    (dict(repetition_prob=1.0), "rl.repetition_prob=1.0"),
    (dict(samples_per_prompt=0), "rl.samples_per_prompt=0"),
    (dict(old_logp="new"), "rl.old_logp='new'"),
    (dict(gen_prompts=0), "rl.gen_prompts=0"),
])
def test_rl_config_refuses_what_cannot_run(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        RLConfig(**kw)


def test_rl_config_from_dict_names_unknown_keys_and_builds_the_loss():
    with pytest.raises(ConfigError, match="unknown key"):
        RLConfig.from_dict({"stepz": 3})
    cfg = RLConfig.from_dict({"old_logp": "recomputed", "tis_cap": 2.0, "is_weight_max": 3.0})
    loss = cfg.loss_config()
    assert loss.tis_cap == 2.0 and loss.is_weight_max == 3.0
