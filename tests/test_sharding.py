"""The model on 8 fake CPU devices: sharded logits and gradients equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax import sharding as shd
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.model.moe import expert_mlp, moe_expert_parallel, route

LIN, FULL = "linear_attention", "full_attention"
CFG = ModelConfig(
    vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
    layer_types=(LIN, LIN, LIN, FULL), num_experts=8, num_experts_per_tok=2, intermediate_size=16,
    rotary_dim=8, block_size=4, initializer_range=0.2, linear_attn_alpha=1.5, mlp_alpha=1.5, full_attn_alpha=1.5,
)
MESHES = {
    "data8": shd.MeshConfig(data=8),
    "data2_expert4": shd.MeshConfig(data=2, expert=4),
    "fsdp2_expert2_tensor2": shd.MeshConfig(fsdp=2, expert=2, tensor=2),
}


def loss_fn(model, ids):
    out = model.forward(ids)
    return jnp.mean(jax.nn.log_softmax(out.logits) ** 2) + 0.01 * out.aux_loss


@pytest.fixture(scope="module")
def reference():
    model = MiniMaxM1(CFG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(8, 11)))
    logits = model(ids)
    grads = nnx.grad(loss_fn)(model, ids)
    return model, ids, np.asarray(logits), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_equals_single_device(reference, name):
    model1, ids, ref_logits, ref_grads = reference
    mesh = shd.make_mesh(MESHES[name])
    model = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), mesh)
    # Created sharded from the same RNG stream: the same values (up to jit-vs-eager rounding of
    # std * normal); then take the reference's exact values, keeping the shardings.
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(model1))):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-6, err_msg=str(p))
        a.set_value(jax.device_put(b.get_value(), a.get_value().sharding))
    ids_s = jax.device_put(ids, shd.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, x: m(x))(model, ids_s)
        grads = nnx.jit(nnx.grad(loss_fn))(model, ids_s)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    flat_ref = dict(nnx.traversals.flatten_mapping(ref_grads))
    for path, g in nnx.traversals.flatten_mapping(jax.tree.map(np.asarray, nnx.to_pure_dict(grads))).items():
        r = flat_ref[path]
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * (np.abs(r).max() + 1e-30), err_msg=str(path))


def test_parameter_shardings_follow_rules():
    mesh = shd.make_mesh(MESHES["fsdp2_expert2_tensor2"])
    model = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), mesh)
    expected = {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "blocks/layers/0/mixer/qkv": P(None, "fsdp", "tensor"),
        "blocks/layers/3/mixer/k": P(None, "fsdp", "tensor"),
        "blocks/layers/0/moe/w1": P(None, "expert", "fsdp", "tensor"),
        "blocks/layers/0/moe/w2": P(None, "expert", "tensor", "fsdp"),
        "blocks/layers/0/moe/router": P(None, "fsdp", None),
        "final_norm/weight": P("fsdp"),
    }
    seen = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = "/".join(map(str, path))
        value = var.get_value()
        spec = shd.spec_for(var.get_metadata()["axes"], value.shape, mesh)
        assert value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), value.ndim), key
        # every shard is really a piece: no device holds the whole of a sharded parameter
        if any(s is not None for s in spec):
            assert value.addressable_shards[0].data.size < value.size, key
        seen[key] = spec
    for key, spec in expected.items():
        assert seen[key] == spec, (key, seen[key], spec)


def test_mesh_errors():
    with pytest.raises(shd.MeshError, match="needs 16 devices but 8"):
        shd.make_mesh(shd.MeshConfig(data=4, expert=4))
    with pytest.raises(shd.MeshError, match="unknown axis"):
        shd.MeshConfig.from_dict({"model": 2})
    with pytest.raises(shd.MeshError, match="does not divide"):
        shd.validate_model_for_mesh(CFG.replace(num_experts=6, num_experts_per_tok=2), shd.MeshConfig(expert=4))


def test_mesh_from_config():
    """train.py / rollout.py's mesh section: one axis may be -1 (the devices the others leave); a
    smaller mesh takes the first devices; impossible ones fail naming the fix."""
    mesh = shd.mesh_from_config({"data": -1, "expert": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "sequence": 1, "tensor": 2}
    assert shd.describe_mesh(mesh) == "mesh data=2 expert=2 tensor=2: 8 of 8 devices"
    assert shd.batch_shards(mesh) == 4 and shd.batch_shards(None) == 1
    one = shd.mesh_from_config({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    assert list(one.devices.flat) == jax.devices()[:1] and "one device" in shd.describe_mesh(one)
    assert dict(shd.mesh_from_config(None).shape)["data"] == 1
    assert list(shd.mesh_from_config({"expert": 4}).devices.flat) == jax.devices()[:4]
    with pytest.raises(shd.MeshError, match="only one axis may be -1"):
        shd.mesh_from_config({"data": -1, "fsdp": -1})
    with pytest.raises(shd.MeshError, match="take 3 devices, which does not divide the 8"):
        shd.mesh_from_config({"data": -1, "expert": 3})
    with pytest.raises(shd.MeshError, match="needs 16 devices but 8 are available"):
        shd.mesh_from_config({"data": 4, "expert": 4})
    with pytest.raises(shd.MeshError, match="mesh.tensor: must be a positive integer"):
        shd.mesh_from_config({"tensor": 0})


def test_generate_on_a_mesh_pads_a_batch_it_does_not_divide(reference):
    """3 prompts on a mesh with 8 batch shards: the rows are padded for the sharded programs and
    dropped after; the greedy tokens and log-probs equal one device's."""
    from m1jax.rollout import SamplingParams, generate

    model1 = reference[0]
    mesh = shd.make_mesh(MESHES["data2_expert4"])
    model = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), mesh)
    nnx.update(model, jax.device_put(nnx.state(model1), shd.state_shardings(nnx.state(model), mesh)))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = SamplingParams(greedy=True, max_new_tokens=4)
    with jax.set_mesh(mesh):
        r = generate(model, prompts, params, num_samples=2, record_routing=True)
    r1 = generate(model1, prompts, params, num_samples=2, record_routing=True)
    assert r.tokens.shape == r1.tokens.shape == (6, 4) and r.prompt_routing.shape == r1.prompt_routing.shape
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(r1.tokens))
    np.testing.assert_array_equal(np.asarray(r.routing), np.asarray(r1.routing))
    np.testing.assert_allclose(np.asarray(r.logprobs), np.asarray(r1.logprobs), atol=1e-5)


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_expert_parallel_equals_dense_under_skewed_routing(capacity):
    """Routing biased so most tokens pick experts of one shard: dropless EP still equals dense;
    with a small capacity the overflow is dropped (and only the overflow)."""
    rng = np.random.default_rng(0)
    b, t, d, e, i, k = 8, 6, 16, 8, 12, 2
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    router = rng.normal(size=(d, e)) * 0.1
    router[:, :2] += 3.0 * np.sign(x.mean(axis=(0, 1)))[:, None]  # experts 0, 1 (shard 0) win
    router = jnp.asarray(router, jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, i)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, i, d)) * 0.3, jnp.float32)
    weights, ids, _ = route(x.reshape(-1, d) @ router, k)
    dense = expert_mlp(x.reshape(-1, d), ids, weights, w1, w3, w2).reshape(b, t, d)
    to_shard0 = np.asarray(ids < 2).sum()
    assert to_shard0 > 0.5 * ids.size  # skewed: an even split would be 1/4
    mesh = shd.make_mesh(shd.MeshConfig(data=2, expert=4))
    with jax.set_mesh(mesh):
        y, stats = jax.jit(lambda *a: moe_expert_parallel(*a, top_k=k, capacity_factor=capacity))(
            x, jnp.ones((b, t)), router, w1, w3, w2
        )
    assert float(stats.rows) == b * t and float(stats.count.sum()) == b * t * k
    if capacity is None:
        np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
    else:
        # Reference for the capacity: on each device (one batch row of t tokens here), (token, slot)
        # pairs in order fill each destination shard's buffer of `cap` rows; the rest are dropped.
        n = t
        cap = int(np.ceil(n * k / 4 * capacity))
        dest = np.asarray(ids).reshape(b, n * k) // 2
        keep = np.zeros_like(dest, bool)
        for r in range(b):
            for shard in range(4):
                idx = np.flatnonzero(dest[r] == shard)[:cap]
                keep[r, idx] = True
        assert not keep.all()
        kept = expert_mlp(x.reshape(-1, d), ids, weights * keep.reshape(-1, k), w1, w3, w2).reshape(b, t, d)
        np.testing.assert_allclose(y, kept, rtol=1e-5, atol=1e-5)


def test_expert_parallel_replays_given_routing():
    """Routing replay under expert parallelism: forced expert ids (here the router's worst two) are
    the ones computed, weighted by their renormalized router probabilities, as on one device."""
    rng = np.random.default_rng(1)
    b, t, d, e, i, k = 8, 6, 16, 8, 12, 2
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.normal(size=(e, d, i)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, i, d)) * 0.3, jnp.float32)
    logits = x.reshape(-1, d) @ router
    forced = jnp.argsort(logits, axis=-1)[:, :k]  # never the top-k
    weights, ids, _ = route(logits, k, forced)
    np.testing.assert_array_equal(ids, forced)
    p = np.asarray(jax.nn.softmax(logits, -1))
    want_w = np.take_along_axis(p, np.asarray(forced), -1)
    np.testing.assert_allclose(weights, want_w / want_w.sum(-1, keepdims=True), rtol=1e-6)
    dense = expert_mlp(x.reshape(-1, d), ids, weights, w1, w3, w2).reshape(b, t, d)
    with jax.set_mesh(shd.make_mesh(shd.MeshConfig(data=2, expert=4))):
        y, stats = jax.jit(lambda *a, ids: moe_expert_parallel(*a, top_k=k, capacity_factor=None, expert_ids=ids))(
            x, jnp.ones((b, t)), router, w1, w3, w2, ids=forced.reshape(b, t, k))
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stats.expert_ids, forced)


def test_memory_plan_matches_real_shards():
    from m1jax.plan.memory import param_bytes

    mc = MESHES["fsdp2_expert2_tensor2"]
    model = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), shd.make_mesh(mc))
    real = sum(v.get_value().addressable_shards[0].data.nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
    total, per_device, _ = param_bytes(CFG, mc)
    assert per_device == real
    assert total == CFG.param_count() * 4


def test_rollout_and_training_share_the_sharded_params(reference):
    """Sampling on the training mesh reads the training parameters in place: same buffers, same
    shardings, no copy or reshard; the greedy tokens equal single-device sampling."""
    from m1jax.lm import make_train_step
    from m1jax.optim import OptimConfig, make_optimizer
    from m1jax.rollout import SamplingParams, generate

    model1 = reference[0]
    mesh = shd.make_mesh(MESHES["data2_expert4"])
    model = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), mesh)
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(model1))):
        a.set_value(jax.device_put(b.get_value(), a.get_value().sharding))

    def buffers():
        return {p: (tuple(s.data.unsafe_buffer_pointer() for s in v.get_value().addressable_shards),
                    v.get_value().sharding) for p, v in nnx.to_flat_state(nnx.state(model))}

    before = buffers()
    prompts = [[int(x) for x in np.random.default_rng(i).integers(1, CFG.vocab_size, size=3 + i % 3)] for i in range(8)]
    params = SamplingParams(greedy=True, max_new_tokens=5)
    with jax.set_mesh(mesh):
        r = generate(model, prompts, params)
    assert buffers() == before
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(generate(model1, prompts, params).tokens))
    # ... and a training step on the same object keeps every parameter's sharding.
    optimizer = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=1e-3)), wrt=nnx.Param)
    ids = jax.device_put(jnp.asarray(np.concatenate([np.asarray(r.tokens)] * 2, 1)), shd.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        make_train_step()(model, optimizer, ids)
    after = buffers()
    ndim = {p: v.get_value().ndim for p, v in nnx.to_flat_state(nnx.state(model))}
    changed = {p: (before[p][1].spec, after[p][1].spec) for p in before
               if not after[p][1].is_equivalent_to(before[p][1], ndim[p])}
    assert not changed, changed
