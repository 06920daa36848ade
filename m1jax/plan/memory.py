"""Per-device memory of a model on a mesh, from the abstract model and the sharding rules.

    python -m m1jax.plan.memory --config=configs/minimax_m1.py --mesh=fsdp=64,expert=8 \
        --batch=64 --seq=8192

Nothing is allocated: parameters come from ``nnx.eval_shape`` and each one's per-device size from
its PartitionSpec (``m1jax.sharding.spec_for``). Parameters, gradients and the AdamW moments
(float32) are exact; activations are an estimate for a training step with one rematerialized
block of the layer pattern at a time (see ``activation_bytes``). For the compiler's own numbers
use the ahead-of-time plan (issue: TPU AOT plans).
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import numpy as np
from flax import nnx

from m1jax.configs import load_config_file, model_config
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.sharding import AXES, MeshConfig, spec_for

GiB = 2**30


def _fake_mesh(mc: MeshConfig):
    return SimpleNamespace(shape=dict(zip(AXES, mc.shape)))


def param_bytes(cfg: ModelConfig, mc: MeshConfig) -> tuple[float, float, list[str]]:
    """(total bytes, per-device bytes, notes on dimensions left replicated) for the parameters."""
    mesh = _fake_mesh(mc)
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    total = per_dev = 0.0
    notes = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        v = var.get_value()
        nbytes = math.prod(v.shape) * np.dtype(v.dtype).itemsize
        spec = spec_for(var.get_metadata()["axes"], v.shape, mesh)
        shards = 1
        for entry in spec:
            for a in (entry,) if isinstance(entry, str) else (entry or ()):
                shards *= mesh.shape[a]
        total += nbytes
        per_dev += nbytes / shards
        axes = var.get_metadata()["axes"]
        for name in axes:
            from m1jax.sharding import RULES

            rule = RULES.get(name)
            if isinstance(rule, str) and mesh.shape[rule] > 1 and rule not in str(spec):
                notes.append(f"{'/'.join(map(str, path))}: '{name}' not divisible by {rule}={mesh.shape[rule]}, replicated")
    return total, per_dev, sorted(set(notes))


def activation_bytes(cfg: ModelConfig, mc: MeshConfig, batch: int, seq: int) -> float:
    """Estimate of live activation bytes per device in a training step, for the tokens a device
    holds: n = batch x seq / (data x fsdp x expert x sequence).

    * the residual stream saved at every scan step (one per repeat of the layer pattern): R x n x D
      in the compute dtype;
    * one block recomputed in the backward pass, per layer: lightning u, o, y, gate in float32
      (6 x H d / tensor floats per token), the normed inputs (4 D), and the MoE's expert-shard
      buffers (4 D + 3 I / tensor per row, for ``moe_chunk`` tokens at a time when set),
      counted twice (values and their gradients); one layer's worth with ``remat_layers``;
    * the target log-probs' float32 logits, ``m1jax.lm.LOGITS_CHUNK`` positions at a time;
    * two layers' weights gathered over fsdp in the compute dtype (the one in use and the next).
    """
    from m1jax.lm import LOGITS_CHUNK

    shards = mc.data * mc.fsdp * mc.expert * mc.sequence
    n = batch * seq / shards
    act = np.dtype(cfg.dtype).itemsize
    period, repeats, tail = cfg.pattern
    d, hd, tp = cfg.hidden_size, cfg.num_heads * cfg.head_dim, mc.tensor
    saved = (repeats + (1 if tail else 0)) * n * d * act
    moe_tokens = min(n, cfg.moe_chunk) if cfg.moe_chunk else n
    # the expert shards' buffers: ep x cap rows, cap = tokens x top_k x capacity_factor / ep, or
    # tokens x top_k when dropless (every buffer sized for all of a device's rows)
    rows = moe_tokens * cfg.num_experts_per_tok * (cfg.moe_capacity_factor or mc.expert)
    moe = rows * (4 * d + 3 * cfg.intermediate_size / tp) * act
    per_layer = n * (6 * hd / tp * 4 + 4 * d * act) + moe
    block = 2 * (1 if cfg.remat_layers else len(period)) * per_layer + len(period) * n * d * act
    logits = 3 * max(1, batch // shards) * min(seq, LOGITS_CHUNK) * cfg.vocab_size / tp * 4
    gathered = 2 * cfg.param_count() / cfg.num_layers * act / (mc.expert * tp)
    return saved + block + logits + gathered


def plan(cfg: ModelConfig, mc: MeshConfig, batch: int, seq: int) -> dict:
    total, params, notes = param_bytes(cfg, mc)
    n_params = cfg.param_count()
    frac = params / total
    grads = frac * n_params * 4  # float32 gradients
    opt = frac * n_params * 8  # AdamW mu, nu in float32
    act = activation_bytes(cfg, mc, batch, seq)
    return dict(params=params, grads=grads, opt=opt, act=act, total=params + grads + opt + act, notes=notes)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m m1jax.plan.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/minimax_m1.py")
    p.add_argument("--mesh", action="append", required=True, help="axis=size,...; repeat for several meshes")
    p.add_argument("--batch", type=int, default=None, help="global batch (sequences); default: data*fsdp*expert")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hbm_gib", type=float, default=95.74, help="per-device memory to compare with (v5p: 95.74)")
    a = p.parse_args(argv)
    cfg = model_config(load_config_file(a.config))
    print(f"{a.config}: {cfg.param_count():,} parameters ({cfg.param_dtype}), compute {cfg.dtype}, seq {a.seq}")
    print(f"| mesh (data, fsdp, expert, tensor) | devices | batch | params GiB | grads GiB | AdamW GiB | "
          f"activations GiB (est.) | total GiB | fits {a.hbm_gib:g} GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.mesh:
        mc = MeshConfig.parse(m)
        batch = a.batch or mc.data * mc.fsdp * mc.expert
        r = plan(cfg, mc, batch, a.seq)
        print(f"| {mc.shape} | {mc.size} | {batch} | {r['params'] / GiB:.1f} | {r['grads'] / GiB:.1f} | "
              f"{r['opt'] / GiB:.1f} | {r['act'] / GiB:.1f} | {r['total'] / GiB:.1f} | "
              f"{'yes' if r['total'] / GiB < a.hbm_gib else 'no'} |")
        for n in r["notes"][:5]:
            print(f"    note: {n}")


if __name__ == "__main__":
    main()
