"""m1jax.optim's chain against a float64 numpy AdamW written from the paper's recipe (b1=0.9,
b2=0.95, eps=1e-15, global-norm clipping, linear warmup, decoupled weight decay)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m1jax.optim import OptimConfig, make_optimizer, schedule


def numpy_adamw(params, grads, lr, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, max_grad_norm=1.0):
    """Updates of AdamW(b1, b2, eps) after clip_by_global_norm, step by step; lr[t] is step t's rate."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    out = []
    for t, g in enumerate(grads, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        scale = min(1.0, max_grad_norm / norm)
        upd = {}
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * g[k] * scale
            v[k] = b2 * v[k] + (1 - b2) * (g[k] * scale) ** 2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            upd[k] = -lr[t - 1] * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * params[k])
            params[k] = params[k] + upd[k]
        out.append(upd)
    return out


def run_chain(tx, params, grads):
    state, out = tx.init(params), []
    for g in grads:
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
        out.append(upd)
    return out


def test_chain_equals_hand_computed_adamw():
    """Five steps: warmup over 2 steps (step 0's rate is 0), weight decay, clipping on (norms ~10)
    and one leaf with gradients ~1e-13, where eps=1e-15 (not optax's default 1e-8) sets the update
    and b2=0.95 (not 0.999) sets how fast it follows the gradient's scale."""
    keys = jax.random.split(jax.random.key(0), 12)
    params = {"w": jax.random.normal(keys[0], (4, 3)), "tiny": jax.random.normal(keys[1], (5,))}
    grads = [{"w": 5 * jax.random.normal(keys[2 + 2 * i], (4, 3)),
              "tiny": 1e-13 * (1 + i) ** 3 * jax.random.normal(keys[3 + 2 * i], (5,))} for i in range(5)]
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0)
    got = run_chain(make_optimizer(cfg), params, grads)
    want = numpy_adamw(params, grads, lr=[0.0, 0.05, 0.1, 0.1, 0.1], weight_decay=0.01)
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_allclose(np.asarray(g[k], np.float64), w[k], rtol=2e-5, atol=1e-9, err_msg=k)
    # the recipe's constants matter here: optax defaults (eps 1e-8, b2 0.999) give other updates
    for other in (dict(eps=1e-8), dict(b2=0.999)):
        off = numpy_adamw(params, grads, lr=[0.0, 0.05, 0.1, 0.1, 0.1], weight_decay=0.01, **other)
        assert max(np.abs(o["tiny"] - w["tiny"]).max() for o, w in zip(off, want)) > 1e-3, other


def test_a_non_finite_gradient_skips_the_step():
    """A NaN gradient leaves parameters and moments untouched: the next step's update is the one the
    chain gives when the bad step never happened."""
    params = {"w": jnp.ones((3,))}
    good = [{"w": jnp.array([0.5, -1.0, 2.0])}, {"w": jnp.array([1.0, 0.25, -0.5])}]
    bad = {"w": jnp.array([jnp.nan, 0.0, 1.0])}
    tx = make_optimizer(OptimConfig(learning_rate=0.1))
    with_bad = run_chain(tx, params, [good[0], bad, good[1]])
    without = run_chain(tx, params, good)
    np.testing.assert_array_equal(with_bad[1]["w"], 0.0)
    np.testing.assert_array_equal(with_bad[2]["w"], without[1]["w"])


def test_cosine_schedule_spans_warmup_and_decay_and_survives_a_run_shorter_than_its_warmup():
    """total_steps is the schedule's length, warmup included: linear from 0 over warmup_steps, then
    a cosine down to min_lr_ratio x lr at total_steps, flat after. A run shorter than its warmup (a
    test's 2-step override of a job's config) still builds a schedule."""
    lr, warm, total, ratio = 3e-4, 2, 6, 0.1
    sched = schedule(OptimConfig(learning_rate=lr, warmup_steps=warm, schedule="cosine", total_steps=total,
                                 min_lr_ratio=ratio))
    want = [lr * t / warm if t < warm else
            lr * (ratio + (1 - ratio) * 0.5 * (1 + np.cos(np.pi * min(t - warm, total - warm) / (total - warm))))
            for t in range(9)]
    np.testing.assert_allclose([float(sched(t)) for t in range(9)], want, rtol=1e-6)
    short = schedule(OptimConfig(learning_rate=lr, warmup_steps=20, schedule="cosine", total_steps=4,
                                 min_lr_ratio=ratio))
    assert np.isclose(float(short(3)), lr * 3 / 20) and np.isclose(float(short(25)), lr * ratio)
