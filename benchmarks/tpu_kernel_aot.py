"""Compile the Pallas TPU (Mosaic) lightning kernels for a real TPU target from a CPU host.

Needs libtpu beside jax (``pip install libtpu==0.0.42.1`` for jax 0.10.2); no TPU hardware:
jax.experimental.topologies gives a compile-only TPU device and libtpu's compiler builds the
kernel, which proves it satisfies Mosaic's tiling and lowering rules.

    python benchmarks/tpu_kernel_aot.py --topology=v5:2x2x1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from kernels_pallas import lightning_attention, lightning_decode  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--topology", default="v5:2x2x1")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head_dim", type=int, default=128)
    a = p.parse_args()
    topo = topologies.get_topology_desc(platform="tpu", topology_name=a.topology)
    mesh = topologies.make_mesh(topo, (len(topo.devices),), ("heads",))
    print(f"target: {topo.devices[0].device_kind} x {len(topo.devices)} (compile-only), mesh {dict(mesh.shape)}")
    b, t, h, d = a.batch, a.seq, a.heads, a.head_dim

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    hs = P(None, None, "heads", None)
    q = sds((b, t, h, d), jnp.bfloat16, hs)
    sig = sds((h,), jnp.float32, P("heads"))
    st = sds((b, h, d, d), jnp.float32, P(None, "heads"))

    def attn(q, k, v, s, s0):
        local = lambda q, k, v, s, s0: lightning_attention(q, k, v, s, s0, impl="pallas", pallas_backend="tpu")  # noqa: E731
        return jax.shard_map(local, mesh=mesh, in_specs=(hs, hs, hs, P("heads"), P(None, "heads")),
                             out_specs=(hs, P(None, "heads")), check_vma=False)(q, k, v, s, s0)

    def train(q, k, v, s, s0):
        def loss(q, k, v, s0):
            o, sT = attn(q, k, v, s, s0)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(sT)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    def decode(q, k, v, s, s0):
        local = lambda q, k, v, s, s0: lightning_decode(q, k, v, s, s0, impl="pallas", pallas_backend="tpu")  # noqa: E731
        hd = P(None, "heads", None)
        return jax.shard_map(local, mesh=mesh, in_specs=(hd, hd, hd, P("heads"), P(None, "heads")),
                             out_specs=(hd, P(None, "heads")), check_vma=False)(q, k, v, s, s0)

    qd = sds((b, h, d), jnp.bfloat16, P(None, "heads", None))
    for name, fn, args in [("forward", attn, (q, q, q, sig, st)), ("forward+backward", train, (q, q, q, sig, st)),
                           ("decode", decode, (qd, qd, qd, sig, st))]:
        t0 = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile()
        hlo = compiled.as_text()
        n_kernels = hlo.count("tpu_custom_call")
        mem = compiled.memory_analysis()
        print(f"{name:>17}: compiled in {time.perf_counter() - t0:.1f}s; Mosaic kernels in HLO: {n_kernels}; "
              f"peak/device {mem.peak_memory_in_bytes / 2**30:.2f} GiB; flops/device "
              f"{compiled.cost_analysis().get('flops', float('nan')):.3g}")
        assert n_kernels > 0, "the compiled program does not call the Pallas TPU kernel"


if __name__ == "__main__":
    main()
