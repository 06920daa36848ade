"""The chunked (XLA) lightning form against the float64 numpy token recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_sequential,
    lightning_decode,
)
from tests.np_reference import lightning_recurrence


def make_inputs(b=2, t=37, h=4, d=8, seed=0, state=False):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, h, d)) * 0.5 for _ in range(3))
    # Slopes from fast (lam = 0.37) to near-1 decay, as in the real model's layer 0 .. 78.
    sigma = np.array([1.0, 0.3, 0.05, 1e-4])[:h]
    s0 = rng.normal(size=(b, h, d, d)) if state else None
    return q, k, v, sigma, s0


def as32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("block_size", [1, 3, 4, 16, 37, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrence(block_size, with_state):
    q, k, v, sigma, s0 = make_inputs(state=with_state)
    ref_o, ref_s = lightning_recurrence(q, k, v, sigma, s0)
    o, s = lightning_attention(*as32(q, k, v, sigma, s0), block_size=block_size)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    scale = np.abs(ref_o).max()
    np.testing.assert_allclose(np.asarray(o), ref_o, atol=2e-6 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=2e-6 * np.abs(ref_s).max(), rtol=0)


@pytest.mark.parametrize("fn", [lightning_attention_naive, lightning_attention_sequential])
def test_references_equal_recurrence(fn):
    q, k, v, sigma, s0 = make_inputs(state=True)
    ref_o, ref_s = lightning_recurrence(q, k, v, sigma, s0)
    o, s = fn(*as32(q, k, v, sigma, s0))
    np.testing.assert_allclose(np.asarray(o), ref_o, atol=2e-6 * np.abs(ref_o).max(), rtol=0)
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=2e-6 * np.abs(ref_s).max(), rtol=0)


def test_decode_after_prefill_equals_longer_prefill():
    q, k, v, sigma, _ = make_inputs(t=20)
    q, k, v, sigma = as32(q, k, v, sigma)
    o_full, s_full = lightning_attention(q, k, v, sigma, block_size=8)
    o, s = lightning_attention(q[:, :13], k[:, :13], v[:, :13], sigma, block_size=8)
    outs = [o]
    for i in range(13, 20):
        oi, s = lightning_decode(q[:, i], k[:, i], v[:, i], sigma, s)
        outs.append(oi[:, None])
    np.testing.assert_allclose(np.concatenate(outs, 1), o_full, atol=1e-5)
    np.testing.assert_allclose(s, s_full, atol=1e-5)


def test_bf16_inputs_fp32_state():
    q, k, v, sigma, _ = make_inputs()
    ref_o, ref_s = lightning_recurrence(q, k, v, sigma)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    o, s = lightning_attention(qb, kb, vb, jnp.asarray(sigma, jnp.float32), block_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # bf16 inputs carry ~2^-8 relative error; accumulation is fp32.
    assert np.abs(np.asarray(o, np.float32) - ref_o).max() < 2e-2 * np.abs(ref_o).max()
    assert np.abs(np.asarray(s) - ref_s).max() < 2e-2 * np.abs(ref_s).max()


def test_jit_and_grad_match_sequential():
    q, k, v, sigma, s0 = as32(*make_inputs(t=19, state=True))

    def loss(fn, q, k, v, s0):
        o, s = fn(q, k, v, sigma, s0)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s)

    chunked = lambda q, k, v, s, s0: lightning_attention(q, k, v, s, s0, block_size=4)  # noqa: E731
    g = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2, 3)))(q, k, v, s0)
    ref = jax.grad(lambda *a: loss(lightning_attention_sequential, *a), argnums=(0, 1, 2, 3))(q, k, v, s0)
    for a, b in zip(g, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
