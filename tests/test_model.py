"""MiniMaxM1 against an independent float64 numpy model, config validation, real-size structure."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import ConfigError, MiniMaxM1, ModelConfig, hybrid_layer_types
from m1jax.configs import load_config_file, model_config
from m1jax.model.layers import apply_rope
from tests import np_reference

LIN, FULL = "linear_attention", "full_attention"


def small_config(**kw):
    base = dict(
        vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_types=(LIN, LIN, FULL, LIN), num_experts=4, num_experts_per_tok=2, intermediate_size=24,
        rotary_dim=4, block_size=3, linear_attn_alpha=1.3, full_attn_alpha=1.6, mlp_alpha=1.2,
        linear_attn_beta=0.9, full_attn_beta=1.1, mlp_beta=0.7, initializer_range=0.3,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # partial RoPE (4 of 8 channels), original decay convention, 3-token blocks over 10 tokens
        {"postnorm": False},
        {"num_heads": 6, "num_kv_heads": 3, "decay_convention": "original"},  # ALiBi-interpolated slopes
        {"num_heads": 6, "num_kv_heads": 2, "decay_convention": "hf", "rotary_dim": 8},
        {"layer_types": (LIN, FULL) * 3 + (LIN,), "num_layers": 7},  # scanned repeats plus a tail
        {"moe_impl": "grouped"},  # sorted rows + ragged_dot (the default on CPU is slots or dense)
    ],
    ids=["base", "prenorm", "alibi6", "hf6", "tail", "grouped-moe"],
)
def test_matches_float64_numpy_model(kw):
    cfg = small_config(**kw)
    model = MiniMaxM1(cfg, rngs=nnx.Rngs(3))
    # Norm weights away from 1 so a missing weight multiply would show.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "norm" in str(path[-2:]):
            var.set_value(var.get_value() * (1 + 0.3 * jax.random.normal(jax.random.key(len(path)), var.shape)))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 10))
    got = np.asarray(model(jnp.asarray(ids)))
    ref = np_reference.forward(cfg, *np_reference.params_from_model(model), ids)
    assert ref.std() > 0.5
    np.testing.assert_allclose(got, ref, atol=2e-4 * ref.std(), rtol=0)


def test_partial_rope_matches_complex_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 16))
    pos = rng.integers(0, 1000, size=(2, 5))
    for r in (16, 8, 2):
        got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), r, 10_000.0))
        ref = np_reference.rope(x, pos.astype(np.float64), r, 10_000.0)
        np.testing.assert_allclose(got, ref, atol=2e-4)  # fp32 angles up to 1000 rad
        np.testing.assert_array_equal(got[..., r:], x[..., r:].astype(np.float32))


def test_real_config_parameter_count():
    cfg = model_config(load_config_file("configs/minimax_m1.py"))
    assert cfg.pattern == ((LIN,) * 7 + (FULL,), 10, ())
    assert cfg.param_count() == 456_089_655_296
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == 456_089_655_296


def test_real_config_decay_examples():
    sig = model_config(load_config_file("configs/minimax_m1.py")).decay_rates()
    assert abs(np.exp(-sig[0, 0]) - 0.3997) < 1e-4  # spec §5.2 examples
    assert abs(np.exp(-sig[78, 63]) - 0.99995) < 1e-5


def _hlo_size(num_layers):
    cfg = small_config(num_layers=num_layers, layer_types=hybrid_layer_types(num_layers, 8), rotary_dim=8)
    model = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    return len(fn.lower(state, jax.ShapeDtypeStruct((1, 8), jnp.int32)).as_text())


def test_layers_are_scanned():
    # 80 layers trace to (about) the same program as 8: one scanned block of the pattern.
    assert _hlo_size(80) < 1.05 * _hlo_size(8)


def test_tiny_config_builds():
    cfg = model_config(load_config_file("configs/tiny.py"))
    assert cfg.pattern == ((LIN,) * 7 + (FULL,), 1, ())
    assert 15.0e6 < cfg.param_count() < 15.6e6  # the benchmarks' model (docs/benchmarks.md)


def test_moe_impls_agree_in_values_and_gradients():
    """Dense (every expert on every token), slots (fixed rows per expert), gathered (each token's
    experts' weights) and grouped (sorted rows, ragged_dot) experts compute the same function: values
    and all input/weight/routing-weight gradients, under skewed routing (which makes the CPU experts
    fall back to dense)."""
    from m1jax.model.cpu import expert_mlp_cpu, expert_mlp_dense, expert_mlp_gathered, expert_mlp_slots
    from m1jax.model.moe import expert_mlp

    n, d, inner, e, k = 40, 16, 24, 5, 2
    ks = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(ks[0], (n, d))
    w1, w3 = (jax.random.normal(kk, (e, d, inner)) / d**0.5 for kk in ks[1:3])
    w2 = jax.random.normal(ks[3], (e, inner, d)) / inner**0.5
    ids = jnp.where(jax.random.uniform(ks[4], (n, k)) < 0.6, jnp.array([0, 3]), jax.random.randint(ks[5], (n, k), 0, e))
    ids = ids.at[:, 1].set(jnp.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % e, ids[:, 1]))  # distinct per row
    weights = jax.nn.softmax(jax.random.normal(ks[4], (n, k)), axis=-1)
    cot = jax.random.normal(ks[5], (n, d))

    def vjp(fn):
        y, pull = jax.vjp(lambda x, wt, a, b, c: fn(x, ids, wt, a, b, c), x, weights, w1, w3, w2)
        return y, pull(cot)

    counts = np.bincount(np.asarray(ids).ravel(), minlength=e)
    assert counts.max() > 24  # the CPU path has 24 slots per expert: it must fall back to dense
    y_grouped, g_grouped = vjp(expert_mlp)
    impls = {"dense": expert_mlp_dense, "slots": functools.partial(expert_mlp_slots, capacity=int(counts.max())),
             "gathered": expert_mlp_gathered, "cpu (dense fallback)": expert_mlp_cpu}
    for name, fn in impls.items():
        y, g = vjp(fn)
        np.testing.assert_allclose(y, y_grouped, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, b in zip(g, g_grouped):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=name)


def test_cpu_experts_use_slots_when_the_load_fits():
    """expert_mlp_cpu computes 1.5x-the-balanced-load slots per expert when every expert's tokens
    fit: equal to the grouped experts, and its program has no [E, N, I] dense product."""
    from m1jax.model.cpu import expert_mlp_cpu
    from m1jax.model.moe import expert_mlp

    n, d, inner, e, k = 64, 8, 16, 4, 2
    ks = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(ks[0], (n, d))
    w1, w3 = (jax.random.normal(kk, (e, d, inner)) / d**0.5 for kk in ks[1:3])
    w2 = jax.random.normal(ks[3], (e, inner, d)) / inner**0.5
    ids = jnp.stack([jnp.arange(n) % e, (jnp.arange(n) + 1) % e], axis=1)  # 32 tokens per expert
    weights = jax.nn.softmax(jax.random.normal(ks[4], (n, k)), axis=-1)
    np.testing.assert_allclose(expert_mlp_cpu(x, ids, weights, w1, w3, w2), expert_mlp(x, ids, weights, w1, w3, w2),
                               rtol=1e-5, atol=1e-5)
    hlo = jax.jit(expert_mlp_cpu).lower(x, ids, weights, w1, w3, w2).as_text()
    assert f"tensor<{e}x48x{inner}xf32>" in hlo  # slots: 1.5 * 32 = 48 rows per expert


def test_cpu_experts_read_only_the_selected_experts_for_a_small_batch():
    """With fewer (token, expert) pairs than experts (batch-1 decode), expert_mlp_cpu gathers the
    selected experts' weights instead of multiplying by all of them: equal to the grouped experts,
    and its program has no dot over all experts."""
    from m1jax.model.cpu import expert_mlp_cpu
    from m1jax.model.moe import expert_mlp

    n, d, inner, e, k = 1, 8, 16, 4, 2
    ks = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(ks[0], (n, d))
    w1, w3 = (jax.random.normal(kk, (e, d, inner)) / d**0.5 for kk in ks[1:3])
    w2 = jax.random.normal(ks[3], (e, inner, d)) / inner**0.5
    weights = jax.nn.softmax(jax.random.normal(ks[4], (n, k)), axis=-1)
    for ids in ([[3, 1]], [[0, 2]]):
        ids = jnp.asarray(ids)
        np.testing.assert_allclose(expert_mlp_cpu(x, ids, weights, w1, w3, w2),
                                   expert_mlp(x, ids, weights, w1, w3, w2), rtol=1e-5, atol=1e-5)
    hlo = jax.jit(expert_mlp_cpu).lower(x, ids, weights, w1, w3, w2).as_text()
    assert f"tensor<{k}x{d}x{inner}xf32>" in hlo  # the k selected experts' w1 and w3
    assert f"tensor<{e}x{n}x{inner}xf32>" not in hlo  # dense's hidden rows of every expert


def test_bfloat16_cache_decode_attention_equals_float32_dots():
    """With a bfloat16 KV cache the decode attention multiplies bfloat16 operands (no float32 copy
    of the cache): the float32 query and softmax weights go in as three bfloat16 parts that sum
    to them exactly, so scores and outputs equal float64 dots over the bf16-rounded cache to float32
    accuracy — including a cache length that no column block divides."""
    from m1jax.model.cpu import _bf16_parts, decode_dot, decode_mix

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 2, 3, 16)) * 10.0 ** rng.integers(-4, 4, size=(2, 2, 3, 16)), jnp.float32)
    parts = np.asarray(jax.jit(_bf16_parts)(x)).astype(np.float64).reshape(2, 2, 3, 3, 16)
    np.testing.assert_array_equal(parts.sum(axis=2), np.asarray(x, np.float64))  # exact, not rounded
    for s in (96, 97):  # blocks of 32; no block
        q = rng.normal(size=(2, 2, 2, 64)).astype(np.float32) * 3
        keys, values = (jnp.asarray(rng.normal(size=(2, 2, s, 64)), jnp.bfloat16) for _ in range(2))
        w = rng.random((2, 2, 2, s)).astype(np.float32)
        k64, v64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (keys, values))
        scores = np.asarray(jax.jit(decode_dot)(jnp.asarray(q), keys))
        mixed = np.asarray(jax.jit(decode_mix)(jnp.asarray(w), values))
        want_s = np.einsum("bkgd,bksd->bkgs", q.astype(np.float64), k64)
        want_m = np.einsum("bkgs,bksd->bkgd", w.astype(np.float64), v64)
        assert np.abs(scores - want_s).max() < 1e-6 * np.abs(want_s).max()
        assert np.abs(mixed - want_m).max() < 1e-6 * np.abs(want_m).max()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"num_heads": 4, "num_kv_heads": 3}, ["num_kv_heads", "not divisible"]),
        ({"rotary_dim": 5}, ["rotary_dim", "even"]),
        ({"rotary_dim": 16}, ["rotary_dim", "exceeds head_dim"]),
        ({"layer_types": (LIN, "mamba", FULL, LIN)}, ["layer_types", "mamba"]),
        ({"layer_types": (LIN, FULL)}, ["layer_types", "num_layers=4"]),
        ({"num_experts_per_tok": 5}, ["num_experts_per_tok"]),
        ({"dtype": "float64"}, ["dtype"]),
        ({"decay_convention": "vllm"}, ["decay_convention"]),
        ({"moe_impl": "sparse"}, ["moe_impl", "grouped"]),
    ],
)
def test_config_errors_name_the_key(kw, words):
    with pytest.raises(ConfigError) as e:
        small_config(**kw)
    for w in words:
        assert w in str(e.value)


def test_from_dict_rejects_unknown_keys():
    d = dataclasses.asdict(small_config())
    d["num_expert"] = 3
    with pytest.raises(ConfigError, match="num_expert"):
        ModelConfig.from_dict(d)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas kernels need a GPU")
def test_model_with_pallas_kernel_matches_xla_on_gpu():
    cfg = small_config(head_dim=16, num_layers=8, layer_types=hybrid_layer_types(8, 4), rotary_dim=16)
    model = MiniMaxM1(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 77)))

    def run(impl):
        m = MiniMaxM1(cfg.replace(lightning_impl=impl), rngs=nnx.Rngs(0))
        nnx.update(m, nnx.state(model))

        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(ids)) ** 2)

        val, grads = nnx.jit(nnx.value_and_grad(loss))(m)
        return np.asarray(m(ids)), val, grads

    # Full fp32 matmuls everywhere: with TF32 (the GPU default) a 1e-7 difference in one layer can
    # flip an input's TF32 rounding and show up as a 1e-3 difference downstream.
    with jax.default_matmul_precision("highest"):
        lp, vp, gp = run("pallas")
        lx, vx, gx = run("xla")
    np.testing.assert_allclose(lp, lx, atol=1e-4 * np.abs(lx).max())
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * (np.abs(b).max() + 1e-12))


def test_lm_head_computes_in_float32_under_bfloat16_activations():
    """lm_head_fp32: bf16 hidden states times the float32 head in float32 (the paper's fix for the
    train/inference probability mismatch), equal to a float64 product to float32 rounding; the bf16
    product (lm_head_fp32=False) is off by ~1e-2 relative, so the test tells the two apart."""
    h = jax.random.normal(jax.random.key(0), (2, 3, 32), jnp.bfloat16)

    def head_error(fp32):
        model = MiniMaxM1(small_config(dtype="bfloat16", lm_head_fp32=fp32), rngs=nnx.Rngs(0))
        got = model.logits(h)
        assert got.dtype == jnp.float32
        ref = np.asarray(h, np.float64) @ np.asarray(model.lm_head[...], np.float64)
        return np.abs(np.asarray(got, np.float64) - ref).max() / ref.std()

    assert head_error(True) < 1e-6
    assert head_error(False) > 1e-4
