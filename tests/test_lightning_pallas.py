"""Pallas lightning kernels (GPU and TPU variants) against the float64 recurrence and jax.grad.

On CPU the kernels run in interpret mode on small shapes; on a GPU machine the GPU variant runs
compiled (``impl="pallas"``), with head dims the Triton tiles accept.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import lightning_attention, lightning_attention_sequential, lightning_decode
from tests.np_reference import lightning_recurrence
from tests.test_lightning_xla import make_inputs

ON_GPU = jax.default_backend() == "gpu"
VARIANTS = ["gpu"] if ON_GPU else ["gpu", "tpu"]


def kw(variant):
    if ON_GPU:
        return dict(impl="pallas")
    return dict(impl="pallas", interpret=True, pallas_backend=variant, chunk=8, block_v=8)


def inputs(b=2, t=37, h=4, d=16, seed=0, state=True):
    return make_inputs(b, t, h, d, seed, state)


def f32(*xs):
    return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t, with_state", [(37, True), (37, False), (16, True), (5, True)])
def test_forward_matches_recurrence(variant, t, with_state):
    q, k, v, sigma, s0 = inputs(t=t, state=with_state)
    ref_o, ref_s = lightning_recurrence(q, k, v, sigma, s0)
    o, s = jax.jit(functools.partial(lightning_attention, **kw(variant)))(*f32(q, k, v, sigma, s0))
    assert o.shape == ref_o.shape and s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), ref_o, atol=2e-6 * np.abs(ref_o).max(), rtol=0)
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=2e-6 * np.abs(ref_s).max(), rtol=0)


def _loss(fn, q, k, v, s0, sigma):
    o, s = fn(q, k, v, sigma, s0)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(s))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("t", [37, 8])
def test_backward_matches_autodiff_reference(variant, t):
    q, k, v, sigma, s0 = f32(*inputs(t=t))
    fn = functools.partial(lightning_attention, **kw(variant))
    grads = jax.jit(jax.grad(lambda *a: _loss(fn, *a, sigma), argnums=(0, 1, 2, 3)))(q, k, v, s0)
    ref = jax.grad(lambda *a: _loss(lightning_attention_sequential, *a, sigma), argnums=(0, 1, 2, 3))(q, k, v, s0)
    for name, g, r in zip(["dq", "dk", "dv", "ds0"], grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_inputs(variant):
    q, k, v, sigma, s0 = inputs(t=24)
    ref_o, ref_s = lightning_recurrence(q, k, v, sigma, s0)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o, s = lightning_attention(*bf, *f32(sigma, s0), **kw(variant))
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert np.abs(np.asarray(o, np.float32) - ref_o).max() < 2e-2 * np.abs(ref_o).max()
    assert np.abs(np.asarray(s) - ref_s).max() < 2e-2 * np.abs(ref_s).max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_after_prefill_equals_longer_prefill(variant):
    q, k, v, sigma, _ = f32(*inputs(t=21, state=False))
    o_full, s_full = lightning_attention(q, k, v, sigma, **kw(variant))
    o, s = lightning_attention(q[:, :17], k[:, :17], v[:, :17], sigma, **kw(variant))
    dec_kw = {key: val for key, val in kw(variant).items() if key in ("impl", "interpret", "pallas_backend")}
    outs = [o]
    for i in range(17, 21):
        oi, s = lightning_decode(q[:, i], k[:, i], v[:, i], sigma, s, **dec_kw)
        outs.append(oi[:, None])
    np.testing.assert_allclose(np.concatenate(outs, 1), o_full, atol=2e-5)
    np.testing.assert_allclose(s, s_full, atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap(variant):
    q, k, v, sigma, s0 = f32(*inputs(t=13))
    fn = functools.partial(lightning_attention, **kw(variant))
    o, s = jax.vmap(lambda q, k, v, s0: fn(q[None], k[None], v[None], sigma, s0[None]))(q, k, v, s0)
    ro, rs = fn(q, k, v, sigma, s0)
    np.testing.assert_allclose(o[:, 0], ro, atol=1e-5)
    np.testing.assert_allclose(s[:, 0], rs, atol=1e-5)


@pytest.mark.skipif(len(jax.devices()) < 4 and not ON_GPU, reason="needs 4 devices")
@pytest.mark.parametrize("variant", VARIANTS)
def test_shard_map_over_heads(variant):
    if ON_GPU:
        pytest.skip("single GPU")
    from jax.sharding import Mesh, PartitionSpec as P

    q, k, v, sigma, s0 = f32(*inputs(t=13))
    mesh = Mesh(np.array(jax.devices()[:4]), ("tensor",))
    fn = functools.partial(lightning_attention, **kw(variant))

    def local(q, k, v, sigma, s0):
        return fn(q, k, v, sigma, s0)

    heads = P(None, None, "tensor", None)
    sharded = jax.jit(
        jax.shard_map(
            local, mesh=mesh,
            in_specs=(heads, heads, heads, P("tensor"), P(None, "tensor")),
            out_specs=(heads, P(None, "tensor")), check_vma=False,
        )
    )
    o, s = sharded(q, k, v, sigma, s0)
    ro, rs = fn(q, k, v, sigma, s0)
    np.testing.assert_allclose(o, ro, atol=1e-5)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    g = jax.grad(lambda q: jnp.sum(sharded(q, k, v, sigma, s0)[0] ** 2))(q)
    gr = jax.grad(lambda q: jnp.sum(fn(q, k, v, sigma, s0)[0] ** 2))(q)
    np.testing.assert_allclose(g, gr, rtol=1e-4, atol=1e-5)


def test_impl_errors():
    q, k, v, sigma, _ = f32(*inputs(t=4, state=False))
    with pytest.raises(ValueError, match="impl"):
        lightning_attention(q, k, v, sigma, impl="cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            lightning_attention(q, k, v, sigma, impl="pallas")
    with pytest.raises(ValueError, match="seq, heads"):
        lightning_attention(q[0], k[0], v[0], sigma)
