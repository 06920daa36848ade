"""CISPO loss: gradient identities against analytic references, and the DAPO/GRPO helpers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl import PRESETS, LossConfig, cispo_loss, group_advantages, groups_with_signal, overlong_penalty, token_weights

B, T, D, V = 4, 6, 5, 7


def setup(seed=0, drift=0.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    w_old = w + drift * jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32).at[:, 0].set(1.0)
    adv = jnp.asarray(rng.normal(size=(B,)), jnp.float32)
    return x, w, w_old, tokens, mask, adv


def logp_fn(w, x, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(x @ w), tokens[..., None], -1)[..., 0]


def grad_of(cfg, w, x, tokens, old_logp, adv, weights):
    return jax.grad(lambda w: cispo_loss(logp_fn(w, x, tokens), old_logp, adv, weights, cfg)[0])(w)


def reinforce_grad(w, x, tokens, adv, weights, token_scale):
    """Analytic -sum_t s_t A grad log pi_t (the scale s held constant)."""
    return jax.grad(lambda w: -jnp.sum(token_scale * adv[:, None] * logp_fn(w, x, tokens) * weights))(w)


def test_on_policy_cispo_equals_ppo_equals_reinforce():
    x, w, _, tokens, mask, adv = setup()
    old = logp_fn(w, x, tokens)  # pi_old = pi_theta: r = 1
    weights = token_weights(mask)
    ref = reinforce_grad(w, x, tokens, adv, weights, 1.0)
    for name in ("cispo", "grpo", "dapo"):
        np.testing.assert_allclose(grad_of(PRESETS[name], w, x, tokens, old, adv, weights), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["grpo", "dapo"])
def test_mask_on_is_clip_off_equals_ppo_clip(preset):
    x, w, w_old, tokens, mask, adv = setup(drift=0.4)
    cfg = PRESETS[preset]
    old = logp_fn(w_old, x, tokens)
    weights = token_weights(mask)

    def ppo_clip(w):
        r = jnp.exp(logp_fn(w, x, tokens) - old)
        a = adv[:, None]
        obj = jnp.minimum(r * a, jnp.clip(r, 1 - cfg.mask_eps_low, 1 + cfg.mask_eps_high) * a)
        return -jnp.sum(obj * weights)

    r = np.exp(np.asarray(logp_fn(w, x, tokens) - old))
    a = np.asarray(adv)[:, None]
    masked = ((a > 0) & (r > 1 + cfg.mask_eps_high)) | ((a < 0) & (r < 1 - cfg.mask_eps_low))
    assert masked[np.asarray(mask) > 0].any() and (~masked).any()  # both regions are exercised
    np.testing.assert_allclose(grad_of(cfg, w, x, tokens, old, adv, weights), jax.grad(ppo_clip)(w),
                               rtol=1e-5, atol=1e-7)


def test_clipped_weight_is_not_differentiated():
    """The gradient is -sg(w) A grad log pi; differentiating w (EasyDeL's bug) changes it."""
    x, w, w_old, tokens, mask, adv = setup(drift=0.5)
    cfg = LossConfig(is_weight_min=0.0, is_weight_max=1.5)
    old = logp_fn(w_old, x, tokens)
    weights = token_weights(mask)
    r = jnp.exp(logp_fn(w, x, tokens) - old)
    clipped_w = jnp.clip(r, 0.0, 1.5)
    ours = grad_of(cfg, w, x, tokens, old, adv, weights)
    np.testing.assert_allclose(ours, reinforce_grad(w, x, tokens, adv, weights, clipped_w), rtol=1e-5, atol=1e-7)

    def no_stop_gradient(w):  # the bug
        lp = logp_fn(w, x, tokens)
        return -jnp.sum(jnp.clip(jnp.exp(lp - old), 0.0, 1.5) * adv[:, None] * lp * weights)

    assert np.abs(np.asarray(jax.grad(no_stop_gradient)(w) - ours)).max() > 1e-3


def test_log_pi_factor_is_present_even_when_clipped():
    """Every token keeps a gradient through log pi, also at the cap (the open-instruct bug dropped it)."""
    x, w, w_old, tokens, mask, adv = setup(drift=0.8)
    cfg = LossConfig(is_weight_min=0.0, is_weight_max=1.0)
    old = logp_fn(w_old, x, tokens)
    ratio = np.exp(np.asarray(logp_fn(w, x, tokens) - old))
    only_clipped = jnp.asarray((ratio > 1.0) & (np.asarray(mask) > 0), jnp.float32)
    assert only_clipped.sum() > 0
    weights = only_clipped / only_clipped.sum()
    g = grad_of(cfg, w, x, tokens, old, adv, weights)
    np.testing.assert_allclose(g, reinforce_grad(w, x, tokens, adv, weights, 1.0), rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(g)).max() > 1e-3


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "prompt_token_mean"])
def test_loss_independent_of_micro_batch_split(aggregation):
    x, w, w_old, tokens, mask, adv = setup(drift=0.3)
    cfg = dataclasses.replace(PRESETS["cispo"], aggregation=aggregation)
    old = logp_fn(w_old, x, tokens)
    groups = jnp.asarray([0, 0, 1, 1])
    weights = token_weights(mask, groups, aggregation)  # once, for the whole optimizer batch
    assert abs(float(weights.sum()) - 1.0) < 1e-6

    def loss(w, sl):
        return cispo_loss(logp_fn(w, x[sl], tokens[sl]), old[sl], adv[sl], weights[sl], cfg)[0]

    full = jax.value_and_grad(loss)(w, slice(0, B))
    halves = [jax.value_and_grad(loss)(w, s) for s in (slice(0, 1), slice(1, B))]
    np.testing.assert_allclose(full[0], halves[0][0] + halves[1][0], rtol=1e-5)
    np.testing.assert_allclose(full[1], halves[0][1] + halves[1][1], rtol=1e-5, atol=1e-8)


def test_token_weights_formulas():
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], jnp.float32)
    np.testing.assert_allclose(token_weights(mask), mask / 6)
    np.testing.assert_allclose(token_weights(mask, aggregation="sequence_mean"),
                               mask / np.array([[3], [1], [2]]) / 3)
    w = token_weights(mask, jnp.asarray([0, 0, 1]), "prompt_token_mean")
    np.testing.assert_allclose(w, mask / np.array([[4], [4], [2]]) / 2)  # group 0 has 4 tokens, group 1 has 2


def test_group_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]])
    a = group_advantages(r)
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-5)  # population std 0.5
    np.testing.assert_allclose(a[1], 0.0)
    np.testing.assert_allclose(a[2], (r[2] - 0.125) / (np.std(r[2]) + 1e-6))
    np.testing.assert_allclose(group_advantages(r, "batch"), (r - r.mean(1, keepdims=True)) / (r.std() + 1e-6))
    np.testing.assert_allclose(group_advantages(r, "none"), r - r.mean(1, keepdims=True))


def test_dynamic_sampling_tolerance():
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.3 + 1e-9, 0.3], [0.0, 0.0, 0.0]])
    assert groups_with_signal(r).tolist() == [False, True, False, False]


def test_overlong_penalty_three_regions():
    got = overlong_penalty([10, 16, 17, 18, 20, 21, 100], max_len=20, cache_len=4)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])


def test_config_errors_and_description():
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="is_weight_min"):
        LossConfig(is_weight_min=2.0, is_weight_max=1.0)
    with pytest.raises(ValueError, match="mask_eps"):
        LossConfig(mask_eps_low=0.2)
    assert "clip(r, 0.0, 5.0)" in PRESETS["cispo"].describe()


def test_tis_factor_is_the_capped_detached_sampler_ratio():
    """tis_cap: each token's loss term is scaled by min(pi_old / pi_sampler, cap), held constant: the
    gradient equals REINFORCE scaled by that factor (times the CISPO weight, 1 here since pi = pi_old)."""
    x, w, w_old, tokens, mask, adv = setup(drift=0.3)
    logp = logp_fn(w, x, tokens)
    sampler = logp_fn(w_old, x, tokens)  # a sampler that differs from the trainer
    cap = 1.2
    cfg = dataclasses.replace(PRESETS["cispo"], tis_cap=cap)
    want = np.minimum(np.exp(np.asarray(logp - sampler)), cap)
    assert 0.1 < (want == cap).mean() < 0.9  # both sides of the cap are exercised
    got = jax.grad(lambda w: cispo_loss(logp_fn(w, x, tokens), logp, adv, mask, cfg, sampler)[0])(w)
    np.testing.assert_allclose(got, reinforce_grad(w, x, tokens, adv, mask, jnp.asarray(want)), rtol=1e-5, atol=1e-6)
    _, metrics = cispo_loss(logp, logp, adv, mask, cfg, sampler)
    np.testing.assert_allclose(metrics["tis_weight_mean"], np.sum(want * mask) / np.sum(mask), rtol=1e-6)
    # without tis_cap (or without sampler log-probs) the factor is 1
    off = jax.grad(lambda w: cispo_loss(logp_fn(w, x, tokens), logp, adv, mask, PRESETS["cispo"], sampler)[0])(w)
    np.testing.assert_allclose(off, reinforce_grad(w, x, tokens, adv, mask, 1.0), rtol=1e-5, atol=1e-6)
