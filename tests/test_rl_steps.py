"""The trainer's view of the sampling policy (log-probs and entropy at temperature T) and the
skipping of non-finite updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.optim import OptimConfig, make_optimizer
from m1jax.rl import PRESETS, RLConfig, RLLearner, token_weights
from m1jax.rl import learner as learner_module
from m1jax.rl.batch import RLBatch, rollout_batch, routing_batch
from m1jax.rl.learner import Collected
from m1jax.rl.steps import cispo_step, policy_stats
from m1jax.rollout import SamplingParams, generate

LIN, FULL = "linear_attention", "full_attention"
CFG = ModelConfig(
    vocab_size=37, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
    layer_types=(LIN, FULL, LIN), num_experts=4, intermediate_size=24, rotary_dim=4, block_size=3,
    initializer_range=0.3, linear_attn_alpha=1.4, mlp_alpha=1.4, full_attn_alpha=1.4,
)
PROMPTS = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def model():
    return MiniMaxM1(CFG, rngs=nnx.Rngs(0))


def test_policy_stats_are_the_samplers_distribution(model, temperature=0.6):
    """On sampled rows (variable prompt lengths, right-padded by rollout_batch) the trainer's log pi_T
    equals the sampler's, and the entropy is the full-vocabulary entropy of softmax(logits / T)."""
    params = SamplingParams(temperature=temperature, max_new_tokens=6, seed=3)
    r = jax.device_get(generate(model, PROMPTS, params, num_samples=2, key=jax.random.key(1)))
    rows = [p for p in PROMPTS for _ in range(2)]
    ids, comp, sampler_lp = rollout_batch(rows, r.tokens, r.logprobs, r.lengths, width=12, pad_id=0)
    lp, entropy = jax.device_get(policy_stats(model, jnp.asarray(ids), temperature))
    assert comp.sum() == r.lengths.sum() > 6
    np.testing.assert_allclose(lp[comp], sampler_lp[comp], atol=2e-4)  # as in test_rollout at T = 1

    z = np.asarray(model(jnp.asarray(ids)), np.float64)[:, :-1] / temperature  # independent float64 reference
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(entropy, -(np.exp(logp) * logp).sum(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lp, np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0], atol=1e-4)


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_non_finite_updates_are_skipped():
    model = MiniMaxM1(CFG, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=1e-2)), wrt=nnx.Param)
    ids = jnp.asarray([[1, 5, 6, 7, 8, 9], [1, 8, 9, 10, 11, 0]])
    comp = jnp.zeros((2, 5), bool).at[:, 2:].set(True)
    w = token_weights(comp)
    before = _params(model)
    nan_old = jnp.full((2, 5), jnp.nan)
    m = cispo_step(model, opt, ids, comp, nan_old, jnp.asarray([1.0, -1.0]), w, PRESETS["cispo"], nan_old)
    assert not bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, _params(model), before)  # skipped: parameters untouched
    m = cispo_step(model, opt, ids, comp, jnp.zeros((2, 5)), jnp.asarray([1.0, -1.0]), w, PRESETS["cispo"], nan_old)
    assert bool(m["finite"])  # a finite step after it does update
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), _params(model), before)
    assert any(jax.tree.leaves(changed))


def test_a_stage_clip_bounds_the_gradient_before_the_optimizer():
    """cispo_step(max_grad_norm=c): under SGD(lr 1) the parameter change is the gradient clipped to
    global norm c (and the unclipped gradient when c is above its norm)."""
    ids = jnp.asarray([[1, 5, 6, 7, 8, 9], [1, 8, 9, 10, 11, 0]])
    comp = jnp.zeros((2, 5), bool).at[:, 2:].set(True)
    w, adv, zeros = token_weights(comp), jnp.asarray([1.0, -1.0]), jnp.zeros((2, 5))

    def change_norm(max_grad_norm):
        model = MiniMaxM1(CFG, rngs=nnx.Rngs(1))
        opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        before = _params(model)
        m = cispo_step(model, opt, ids, comp, zeros, adv, w, PRESETS["cispo"], zeros,
                       max_grad_norm=None if max_grad_norm is None else jnp.float32(max_grad_norm))
        delta = jax.tree.map(lambda a, b: np.sum((a.astype(np.float64) - b) ** 2), _params(model), before)
        return float(np.sqrt(sum(jax.tree.leaves(delta)))), float(m["grad_norm"])

    free, gnorm = change_norm(None)
    assert free == pytest.approx(gnorm, rel=1e-4) and gnorm > 0.1
    assert change_norm(gnorm / 4)[0] == pytest.approx(gnorm / 4, rel=1e-4)
    assert change_norm(gnorm * 4)[0] == pytest.approx(gnorm, rel=1e-4)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "prompt_token_mean"])  # token_mean: as the first
def test_a_step_with_fewer_groups_is_padded_and_updates_as_without_padding(aggregation, monkeypatch):
    """One kept group of rl.prompts_per_step=4: the learner trains on a full step's 8 rows (the 6
    padding rows have no completion token), so its jitted steps see one shape whatever the number of
    kept groups; under SGD the update equals cispo_step on the 2 kept rows alone. (The router's
    load-balancing loss counts every position, padding included: it is off here.)"""
    cfg = dataclasses.replace(CFG, router_aux_loss_coef=0.0)
    ids = np.asarray([[1, 5, 6, 7, 8, 9], [1, 8, 9, 10, 11, 0]], np.int32)
    comp = np.zeros((2, 5), bool)
    comp[0, 2:], comp[1, 1:4] = True, True
    old, adv = np.where(comp, -0.7, 0.0).astype(np.float32), np.asarray([1.0, -1.0], np.float32)
    rl = RLConfig(prompts_per_step=4, samples_per_prompt=2, minibatches=1, updates_per_rollout=1,
                  aggregation=aggregation)
    shapes = []  # of the ids each jitted step gets from the learner
    stats, step = learner_module.policy_stats, learner_module.cispo_step
    monkeypatch.setattr(learner_module, "policy_stats", lambda m, ids, *a, **k: shapes.append(ids.shape) or stats(
        m, ids, *a, **k))
    monkeypatch.setattr(learner_module, "cispo_step", lambda m, o, ids, *a, **k: shapes.append(ids.shape) or step(
        m, o, ids, *a, **k))

    def gradient(update):  # the gradient of the one update (the "optimizer" keeps it as its state)
        keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                            lambda g, _, p=None: (jax.tree.map(jnp.zeros_like, g), g))
        model = MiniMaxM1(cfg, rngs=nnx.Rngs(2))
        opt = nnx.Optimizer(model, keep, wrt=nnx.Param)
        update(model, opt)
        return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt.opt_state)))

    def learner_update(model, opt):
        lrn = RLLearner(model, opt, rl, sample=None, score=None, problems=None, width=6, max_new_tokens=4, pad_id=0,
                        key=jax.random.key(0))
        lrn.update(Collected({}, [], None, None, RLBatch(ids, comp, old), adv), step=0, rl_step=0)

    def alone(model, opt):
        w = token_weights(jnp.asarray(comp), jnp.asarray([0, 0]), aggregation)
        cispo_step(model, opt, jnp.asarray(ids), jnp.asarray(comp), jnp.asarray(old), jnp.asarray(adv), w,
                  rl.loss_config(), jnp.asarray(old))

    got, want = gradient(learner_update), gradient(alone)
    assert shapes == [(8, 6)]  # the one update, a full step's rows (pi_old is the sampler's: no extra forward)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(want))  # float32 sums over 2 vs 8 rows differ by rounding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), got, want)
    assert scale > 1e-3


def test_a_steps_entropy_and_logprob_corr_are_of_the_policy_before_its_updates():
    """With pi_old the sampler's, the learner takes the step's entropy and sampler-trainer log-prob
    correlation from its first update's forward: they are policy_stats' on the parameters the step
    started from (two passes of a large SGD step: the second pass's forward sees other values)."""
    ids = np.asarray([[1, 5, 6, 7, 8, 9], [1, 8, 9, 10, 11, 0], [1, 9, 3, 4, 2, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    comp = np.zeros((4, 5), bool)
    comp[:, 2:4], comp[0, 4], comp[3, 4] = True, True, True
    model = MiniMaxM1(CFG, rngs=nnx.Rngs(2))
    lp, entropy = jax.device_get(policy_stats(model, jnp.asarray(ids), 1.0))
    sampler = np.where(comp, lp + 0.3 * np.random.default_rng(0).standard_normal(lp.shape), 0.0).astype(np.float32)
    rl = RLConfig(prompts_per_step=2, samples_per_prompt=2, minibatches=1, updates_per_rollout=2)
    lrn = RLLearner(model, nnx.Optimizer(model, optax.sgd(3.0), wrt=nnx.Param), rl, sample=None, score=None,
                    problems=None, width=6, max_new_tokens=4, pad_id=0, key=jax.random.key(0))
    rec = lrn.update(Collected({}, [], None, None, RLBatch(ids, comp, sampler), np.asarray([1, -1, 1, -1], np.float32)),
                     step=0, rl_step=0)
    after, after_entropy = jax.device_get(policy_stats(model, jnp.asarray(ids), 1.0))
    assert abs(float(after_entropy[comp].mean()) - float(entropy[comp].mean())) > 1e-2  # the updates moved it
    np.testing.assert_allclose(rec["entropy"], entropy[comp].mean(), rtol=1e-5)
    np.testing.assert_allclose(rec["logprob_corr"], np.corrcoef(lp[comp], sampler[comp])[0, 1], rtol=1e-5)


def test_routing_replay_removes_the_gap_of_a_flipped_expert_choice():
    """R3: a trainer whose router differs from the sampler's by 1e-6 (experts 0 and 1 tied in the
    sampler, so the perturbation flips some top-2 choices) gives other log-probs for the sampled
    tokens; replaying the sampler's recorded routing removes that gap, down to what the 1e-6 change
    of the gate values makes. Replay on the sampler's own model changes nothing beyond float noise:
    the recorded routing is aligned with the trainer's rows."""
    def routers(model):  # every layer's router, [repeats, D, E]
        return [layer.moe.router for blocks in (model.blocks, model.tail) if blocks is not None
                for layer in blocks.layers]

    sampler = MiniMaxM1(CFG, rngs=nnx.Rngs(2))
    for router in routers(sampler):
        router.set_value(router[...].at[..., 1].set(router[..., 0]))  # experts 0 and 1 tie everywhere
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    out = jax.device_get(generate(sampler, PROMPTS, params, num_samples=2, key=jax.random.key(1), record_routing=True))
    rows = [p for p in PROMPTS for _ in range(2)]
    ids, comp, sampler_lp = rollout_batch(rows, out.tokens, out.logprobs, out.lengths, width=16, pad_id=0)
    replay = routing_batch(rows, np.repeat(out.prompt_routing, 2, 0), out.routing, out.lengths, width=16)
    expert_ids = jnp.asarray(np.moveaxis(replay, 2, 0))

    def gap(model, ids_=None):
        lp, _ = jax.device_get(policy_stats(model, jnp.asarray(ids), 1.0, ids_))
        return float(np.abs(lp - sampler_lp)[comp].max())

    base = gap(sampler)
    assert base < 2e-4 and gap(sampler, expert_ids) < 2 * base + 1e-5  # the same float noise
    trainer = MiniMaxM1(CFG, rngs=nnx.Rngs(2))
    nnx.update(trainer, nnx.state(sampler))
    for router in routers(trainer):
        w = router[...]
        router.set_value(w.at[..., 1].add(1e-6 * jax.random.normal(jax.random.key(7), w[..., 1].shape)))
    assert gap(trainer) > 1e-2  # some expert choices flipped (measured: 2.6)
    assert gap(trainer, expert_ids) < 1e-4  # the 1e-6 change of the gate values remains (measured: 3.5e-5)
