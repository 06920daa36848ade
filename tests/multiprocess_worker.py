"""One process of the multi-process test: a few optimizer steps of the tiny model on a
(data=2, expert=4) mesh spanning all processes' CPU devices. Prints the losses as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[3]}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from m1jax.distributed import maybe_initialize  # noqa: E402

nproc, pid = int(sys.argv[1]), int(sys.argv[2])
if nproc > 1:
    maybe_initialize(f"localhost:{sys.argv[4]}", nproc, pid)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m1jax import sharding as shd  # noqa: E402
from m1jax.lm import make_train_step  # noqa: E402
from m1jax.model import MiniMaxM1, ModelConfig  # noqa: E402
from m1jax.optim import OptimConfig, make_optimizer  # noqa: E402

LIN, FULL = "linear_attention", "full_attention"
cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  layer_types=(LIN, FULL), num_experts=4, intermediate_size=16, rotary_dim=8, block_size=4)
mesh = shd.make_mesh(shd.MeshConfig(data=2, expert=4))
model = shd.create_sharded(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)), mesh)
optimizer = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=3e-3)), wrt=nnx.Param)
step = make_train_step()
global_ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 12)).astype(np.int32)
sharding = shd.batch_sharding(mesh)
ids = jax.make_array_from_callback(global_ids.shape, sharding, lambda idx: global_ids[idx])
losses = []
with jax.set_mesh(mesh):
    for _ in range(3):
        losses.append(float(step(model, optimizer, ids)["loss"]))
print("LOSSES " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(), "losses": losses}))
