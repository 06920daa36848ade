"""TPU ahead-of-time plans (m1jax.plan, m1jax.plan.aot) and the model options they rely on.

The compile tests need libtpu (``pip install -e ".[tpu]"``) and are skipped without it; they
compile a 2-layer model for a v5p-8 slice (4 chips) with libtpu's real TPU compiler.
"""

import dataclasses
import importlib.util
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m1jax.plan import aot, pod
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.sharding import AXES, MeshConfig, spec_for

LIN, FULL = "linear_attention", "full_attention"
GiB = 2**30
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='needs libtpu: pip install -e ".[tpu]"')
SMALL = ["--config=configs/tiny.py", "--model.num_layers=2", f"--model.layer_types=['{LIN}','{FULL}']",
         "--model.dtype='bfloat16'", "--model.remat=True", "--topology=v5p-8"]


def fake_mesh(**sizes):
    return SimpleNamespace(shape=dict(zip(AXES, MeshConfig(**sizes).shape)))


def test_topology_names():
    assert [aot.topology_name(n) for n in ("v5p-8", "v5p-128", "v5p-256", "v5p-512", "v5p-1024")] == [
        "v5:2x2x1", "v5:4x4x4", "v5:4x4x8", "v5:4x8x8", "v5:8x8x8"]
    assert [aot.topology_name(n) for n in ("v6e-64", "v6e-256", "v5e-256", "v5:4x4x12")] == [
        "v6e:8x8", "v6e:16x16", "v5e:16x16", "v5:4x4x12"]
    for bad in ("v5p-384", "v5litepod-16", "tpu"):
        with pytest.raises(aot.PlanError, match="topology"):
            aot.topology_name(bad)
    assert pod.next_slice("v5p-512") == "v5p-1024" and pod.next_slice("v5:2x2x1") is None


def test_vocab_sharded_only_when_divisible_and_said_so():
    real = ModelConfig()  # vocab 200064 = 2^7 * 3 * 521
    mesh = fake_mesh(fsdp=32, expert=8, tensor=8)
    assert spec_for(("vocab", "embed"), (real.vocab_size, real.hidden_size), mesh) == P("tensor", "fsdp")
    assert any("vocab 200064 is sharded over tensor=8" in n for n in aot.sharding_notes(real, mesh))
    odd = ModelConfig(vocab_size=510, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      layer_types=(LIN,), num_experts=4, intermediate_size=16, rotary_dim=8)
    mesh = fake_mesh(fsdp=2, tensor=4)
    assert spec_for(("vocab", "embed"), (510, 32), mesh) == P(None, "fsdp")  # kept whole, not padded
    notes = aot.sharding_notes(odd, mesh)
    assert any("vocab 510 is not divisible by tensor=4" in n and "pad vocab_size" in n for n in notes)
    assert any(n.startswith("parameter embed: vocab=510") for n in notes)
    assert any(n.startswith("parameter lm_head: vocab=510") for n in notes)
    assert any("num_kv_heads=2 is not divisible by tensor=4" in n for n in notes)


def test_shape_checks_name_the_fix():
    s = aot.Shapes(train_batch=6, seq_len=128, rollout_batch=8, context=256, prompt_len=64, prefill_chunk=64)
    with pytest.raises(aot.PlanError, match="--batch=6 is not divisible by .* 4"):
        aot.validate_shapes(s, 4)
    with pytest.raises(aot.PlanError, match="--prefill_chunk=48 must divide --prompt_len=64"):
        aot.validate_shapes(dataclasses.replace(s, train_batch=8, prefill_chunk=48), 4)
    assert pod.default_mesh(256, 32, {}) == MeshConfig(fsdp=8, expert=32)
    assert pod.default_mesh(256, 32, {"tensor": 8, "expert": 8}) == MeshConfig(fsdp=4, expert=8, tensor=8)


@pytest.mark.parametrize("field", ["attention_chunk", "remat_layers"])
def test_memory_options_do_not_change_values(field):
    """Chunked softmax attention (queries 4 at a time over 11 tokens, with padding) and per-layer
    remat give the same logits and gradients as the plain model."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      layer_types=(FULL,), num_experts=4, intermediate_size=16, rotary_dim=8,
                      initializer_range=0.2, remat=True, attention_chunk=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 11)))
    mask = jnp.ones((2, 11), jnp.int32).at[0, :3].set(0)

    @nnx.jit
    def logits_and_grads(model):
        return model(ids, mask), nnx.grad(lambda m: jnp.sum(m(ids, mask) ** 2))(model)

    def run(c):
        logits, grads = logits_and_grads(MiniMaxM1(c, rngs=nnx.Rngs(0)))
        return logits, jax.tree.leaves(nnx.to_pure_dict(grads))

    ref_logits, ref_grads = run(cfg)
    logits, grads = run(cfg.replace(**{field: 4 if field == "attention_chunk" else True}))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_logits).max()))
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


@needs_libtpu
def test_plan_compiles_small_config_with_the_pallas_kernel(capsys, monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    code = pod.main(SMALL + ["--mesh.fsdp=1", "--mesh.expert=2", "--mesh.tensor=2", "--batch=4", "--seq_len=512",
                              "--prompt_len=256", "--context=1024", "--prefill_chunk=128"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("fits (margin") == 3, out
    # The lightning layer runs on the Pallas TPU (Mosaic) kernels, forward and both backward sweeps.
    train, prefill, decode = out.split("\ntrain")[1], out.split("\nprefill")[1], out.split("\ndecode")[1]
    for name in ("lightning_fwd", "lightning_bwd_dq", "lightning_bwd_dkv"):
        assert name in train.split("\nprefill")[0], train
    assert "lightning_fwd" in prefill.split("\ndecode")[0] and "lightning_decode" in decode, out
    assert "mesh: {'data': 1, 'fsdp': 1, 'expert': 2, 'sequence': 1, 'tensor': 2}" in out


@needs_libtpu
def test_oversized_plan_fails_with_the_compiler_message(capsys, monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    # float32 logits of 4 x 2^20 tokens x 65536 vocab / 4 chips = 256 GiB per chip > 95.74 GiB of HBM.
    code = pod.main(SMALL + ["--program=train", "--batch=4", f"--seq_len={2**20}", "--model.vocab_size=65536"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "DOES NOT FIT: RESOURCE_EXHAUSTED: Ran out of memory on HBM" in out and "exceeds available HBM (95.74G)" in out
    assert "try: " in out and "--topology=v5p-16" in out


@needs_libtpu
def test_bad_mesh_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        pod.main(SMALL + ["--mesh.fsdp=3"])
    assert e.value.code == 2
    assert "choose --mesh.* sizes whose product is 4" in capsys.readouterr().err


def test_auto_meshes_prefer_the_least_communication_that_fits():
    """--mesh=auto's candidates: every one multiplies to the chips and splits the batch; those
    estimated to fit come first, with no sequence axis while one fits; when the state alone leaves
    too little room for a whole sequence per chip group, the sequence axis splits it."""
    from m1jax.plan.memory import plan as estimate

    cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=32,
                      layer_types=(LIN,) * 7 + (FULL,), num_experts=8, intermediate_size=512, rotary_dim=32)
    found = pod.auto_meshes(cfg, 64, 8, 4096, hbm=16 * GiB)
    assert all(mc.size == 64 and 8 % (mc.fsdp * mc.expert) == 0 for _, mc in found)
    first = found[0][1]
    assert found[0][0] <= 0.9 * 16 * GiB and first.sequence == 1, found[:3]
    # 32x the length: one sequence per chip group no longer fits without splitting it.
    long = pod.auto_meshes(cfg, 64, 8, 4096 * 32, hbm=16 * GiB)
    assert long[0][0] <= 0.9 * 16 * GiB and long[0][1].sequence > 1, long[:3]
    assert all(estimate(cfg, mc, 8, 4096 * 32)["total"] > 0.9 * 16 * GiB for _, mc in long if mc.sequence == 1)


@needs_libtpu
def test_plan_compiles_a_sequence_axis_with_the_pallas_kernel(capsys, monkeypatch):
    """The 2-layer model with its length split over sequence=2 (x tensor=2) on v5p-8: the train step
    runs the Pallas forward and both backward kernels inside each shard, and the prefill fits."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    code = pod.main(SMALL + ["--mesh.fsdp=1", "--mesh.sequence=2", "--mesh.tensor=2", "--batch=2", "--seq_len=512",
                              "--rollout_batch=2", "--prompt_len=256", "--context=1024", "--prefill_chunk=256",
                              "--program=train"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'sequence': 2" in out and "each split over sequence=2" in out
    for name in ("lightning_fwd", "lightning_bwd_dq", "lightning_bwd_dkv"):
        assert name in out, out


@needs_libtpu
def test_plan_auto_mesh_chooses_and_compiles(capsys, monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    code = pod.main(SMALL + ["--mesh=auto", "--program=train", "--batch=4", "--seq_len=256", "--max_tries=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mesh auto: " in out and "mesh auto: chose {'data': 1," in out and "peak train" in out
    with pytest.raises(SystemExit) as e:
        pod.main(SMALL + ["--mesh=auto", "--mesh.fsdp=2", "--batch=4"])
    assert e.value.code == 2 and "drop the --mesh.* flags" in capsys.readouterr().err


@needs_libtpu
def test_plan_takes_the_rl_config(capsys, monkeypatch):
    """configs/minimax_m1_rl.py plans as it trains: its sampling, rollout and rl_optim sections are
    read (here with the model shrunk to two layers so the train step compiles in seconds)."""
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    small = ["--model.num_layers=2", f"--model.layer_types=['{LIN}','{FULL}']", "--model.hidden_size=256",
             "--model.num_heads=4", "--model.num_kv_heads=2", "--model.head_dim=64", "--model.intermediate_size=256"]
    code = pod.main(["--config=configs/minimax_m1_rl.py", "--topology=v5p-8", "--program=train", "--batch=4",
                     "--seq_len=512", *small])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("fits (margin") == 1, out
