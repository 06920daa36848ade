"""Sequence parallelism on 8 fake CPU devices: with the length dimension split over the mesh's
``sequence`` axis, the lightning operator, the model (logits, aux loss, gradients), the CISPO step
and the rollout prefill equal one device, on lengths the axis does not divide, with left padding
and with an initial lightning state. Mutations of the inter-shard terms fail these checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import sharding as shd
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.model import attention as attention_mod
from m1jax.model import lightning as lightning_mod

LIN, FULL = "linear_attention", "full_attention"
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
    layer_types=(LIN, LIN, LIN, FULL), num_experts=4, num_experts_per_tok=2, intermediate_size=16,
    rotary_dim=8, block_size=2, attention_chunk=2, initializer_range=0.2, linear_attn_alpha=1.5,
    mlp_alpha=1.5, full_attn_alpha=1.5,
)
MESHES = {  # mesh, model overrides that must not change any value
    "sequence4_data2": (shd.MeshConfig(data=2, sequence=4), {}),
    # each device's 6 tokens go through the experts 4 at a time (two chunks, one padded)
    "fsdp2_expert2_sequence2_moe_chunk4": (shd.MeshConfig(fsdp=2, expert=2, sequence=2), {"moe_chunk": 4}),
}
B, T = 4, 11  # 11 tokens: neither sequence=4 nor 2 divides them


def _close(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (np.abs(b).max() + 1e-30), err_msg=what)


def _inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, CFG.vocab_size, size=(B, T)), jnp.int32)
    lengths = np.array([T, 7, 3, 10])  # left-padded rows: the real tokens end every row
    mask = jnp.asarray(np.arange(T)[None, :] >= (T - lengths)[:, None], jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return ids, mask, positions


def loss_fn(model, ids, mask, positions):
    out = model.forward(ids, mask, positions)
    lp = jax.nn.log_softmax(out.logits)
    return jnp.sum(jnp.mean(lp ** 2, -1) * mask) / mask.sum() + 0.01 * out.aux_loss, out


def _run(model, *inputs):
    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, *inputs)
    return loss, out.logits, out.aux_loss, nnx.to_pure_dict(grads)


def _on_mesh(model1, mc, **overrides):
    """The mesh and a copy of ``model1`` created straight into its shardings, with model1's values."""
    mesh = shd.make_mesh(mc)
    model = shd.create_sharded(lambda: MiniMaxM1(CFG.replace(**overrides), rngs=nnx.Rngs(0)), mesh)
    nnx.update(model, jax.device_put(nnx.state(model1), shd.state_shardings(nnx.state(model), mesh)))
    return mesh, model


@pytest.fixture(scope="module")
def reference():
    model = MiniMaxM1(CFG, rngs=nnx.Rngs(0))
    return model, jax.device_get(_run(model, *_inputs()))


def _model_on_mesh(reference, name):
    model1, _ = reference
    mc, overrides = MESHES[name]
    mesh, model = _on_mesh(model1, mc, **overrides)
    inputs = tuple(jax.device_put(x, shd.batch_sharding(mesh)) for x in _inputs())
    with jax.set_mesh(mesh):
        return jax.device_get(nnx.jit(_run)(model, *inputs))


@pytest.mark.parametrize("name", list(MESHES))
def test_model_on_a_sequence_axis_equals_one_device(reference, name):
    loss, logits, aux, grads = _model_on_mesh(reference, name)
    ref_loss, ref_logits, ref_aux, ref_grads = reference[1]
    _close(logits, ref_logits, "logits")
    _close(aux, ref_aux, "aux loss")
    _close(loss, ref_loss, "loss")
    flat_ref = dict(nnx.traversals.flatten_mapping(ref_grads))
    for path, g in nnx.traversals.flatten_mapping(grads).items():
        _close(g, flat_ref[path], str(path))


def test_model_fails_without_the_inter_shard_terms(reference, monkeypatch):
    """Mutations: lightning shards that ignore the earlier shards' states, or softmax shards whose
    causal mask uses local row indices: the logits no longer equal one device."""
    ref_logits = reference[1][1]
    combine = lightning_mod.combine_sequence_shards
    monkeypatch.setattr(lightning_mod, "combine_sequence_shards",
                        lambda q, *a, **kw: combine(jnp.zeros_like(q), *a, **kw))
    logits = _model_on_mesh(reference, "sequence4_data2")[1]
    assert np.abs(logits - ref_logits).max() > 1e-3
    monkeypatch.setattr(lightning_mod, "combine_sequence_shards", combine)
    monkeypatch.setattr(attention_mod, "_shard_rows", lambda r: jnp.arange(r))
    logits = _model_on_mesh(reference, "sequence4_data2")[1]
    assert np.abs(logits - ref_logits).max() > 1e-3


@pytest.mark.parametrize("with_state", [False, True])
def test_lightning_operator_on_a_sequence_axis(with_state):
    """The operator alone, values and gradients of q, k, v and the initial state (and of the final
    state), sequence=4 x tensor=2 on 10 tokens (front-padded to 12)."""
    rng = np.random.default_rng(1)
    b, t, h, d = 2, 10, 4, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)) * 0.5, jnp.float32) for _ in range(3))
    s0 = jnp.asarray(rng.normal(size=(b, h, d, d)), jnp.float32) if with_state else None
    sigma = jnp.asarray([0.05, 0.2, 0.5, 0.9], jnp.float32)

    def loss(q, k, v, s0):
        o, s = lightning_mod._lightning_op(q, k, v, sigma, s0, CFG)
        return jnp.sum(o ** 2) + jnp.sum(jnp.sin(s)), (o, s)

    grad = functools.partial(jax.value_and_grad, loss, argnums=(0, 1, 2, 3) if with_state else (0, 1, 2), has_aux=True)
    ref = grad()(q, k, v, s0)
    mesh = shd.make_mesh(shd.MeshConfig(sequence=4, tensor=2))
    with jax.set_mesh(mesh):
        out = jax.jit(grad())(q, k, v, s0)
    for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        _close(a, r)


def test_cispo_step_on_a_sequence_axis_equals_one_device():
    """The whole CISPO update (loss, gradient norm, new parameters) on data=2 x sequence=4, on 8
    tokens: the activations are split 2 tokens a shard (the other tests' lengths need padding)."""
    from m1jax.optim import OptimConfig, make_optimizer
    from m1jax.rl import PRESETS, token_weights
    from m1jax.rl.steps import cispo_step

    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(1, CFG.vocab_size, size=(2, 8)), jnp.int32)
    comp = jnp.zeros((2, 7), bool).at[:, 3:].set(True)
    old = jnp.asarray(rng.normal(size=(2, 7)) * 0.1 - 4.0, jnp.float32)
    adv = jnp.asarray([1.0, -0.5])
    w = token_weights(comp)

    def step(model, *args):
        opt = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=1e-2)), wrt=nnx.Param)
        metrics = cispo_step(model, opt, *args, PRESETS["cispo"])
        return {k: v for k, v in metrics.items() if k != "ratio"}, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    model1 = MiniMaxM1(CFG, rngs=nnx.Rngs(0))
    mesh, model = _on_mesh(model1, shd.MeshConfig(data=2, sequence=4))
    ref = jax.device_get(step(model1, ids, comp, old, adv, w))
    args = tuple(jax.device_put(x, shd.batch_sharding(mesh, x.ndim)) for x in (ids, comp, old, adv, w))
    with jax.set_mesh(mesh):
        out = jax.device_get(nnx.jit(step)(model, *args))
    for key in ("loss", "grad_norm", "nll"):
        _close(out[0][key], ref[0][key], key)
    flat_ref = dict(nnx.traversals.flatten_mapping(ref[1]))
    for path, p in nnx.traversals.flatten_mapping(out[1]).items():
        _close(p, flat_ref[path], str(path))


def test_rollout_prefill_on_a_sequence_axis_equals_one_device():
    """engine.prefill of left-padded prompts in two chunks of 5 (the second starting from the
    first's lightning states and KV columns) on data=2 x sequence=4: the same cache and first token."""
    from m1jax.rollout.engine import prefill

    model1 = MiniMaxM1(CFG, rngs=nnx.Rngs(0))
    ids, mask, _ = (x[:, 1:] for x in _inputs())  # 10 columns
    graphdef, state = nnx.split(model1)
    ref = jax.device_get(prefill(graphdef, state, ids, mask, max_new=3, chunk=5))
    mesh, model = _on_mesh(model1, shd.MeshConfig(data=2, sequence=4))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        args = (jax.device_put(x, shd.batch_sharding(mesh)) for x in (ids, mask))
        out = jax.device_get(prefill(graphdef, state, *args, max_new=3, chunk=5))
    for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        _close(a, r)
    np.testing.assert_array_equal(np.argmax(out[0], -1), np.argmax(ref[0], -1))
