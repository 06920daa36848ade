"""Lightning attention benchmark: time per token and achieved GFLOP/s, measured side by side.

CPU (default):
  python benchmarks/lightning_attention.py
    XLA chunked form vs naive masked O(T^2) vs sequential scan, T = 1K..32K (128K chunked only);
    then a 1M-token forward of the chunked form with its peak memory.
GPU (run on a GPU machine):
  python benchmarks/lightning_attention.py --gpu
    Pallas GPU kernel vs the XLA chunked path vs flash-linear-attention's Triton chunk_simple_gla
    (same math: scalar per-head decay), forward and forward+backward, bf16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import (  # noqa: E402
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_sequential,
)


def bench(fn, *args, reps=5, min_time=0.2):
    """Best and median wall time of fn(*args) after a warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return min(times), statistics.median(times)


def flops(kind, t, d, c):
    """Algorithmic FLOPs of one head: chunked 2Cd+2Cd+4d^2 per token; naive 4T^2 d; sequential 4d^2."""
    if kind == "chunked":
        return t * (4 * min(c, t) * d + 4 * d * d)
    if kind == "naive":
        return 4 * t * t * d
    return 4 * t * d * d


def inputs(b, t, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.nn.silu(jax.random.normal(kk, (b, t, h, d), jnp.float32)).astype(dtype) for kk in ks)
    sigma = jnp.asarray(2.0 ** (-8.0 * (np.arange(h) + 1) / h), jnp.float32)
    return q, k, v, sigma


def cpu_main(args):
    b, h, d = 1, args.heads, args.head_dim
    print(f"CPU ({jax.devices()[0].device_kind}), batch {b}, heads {h}, head_dim {d}, chunk {args.chunk}, fp32, "
          f"loadavg {os.getloadavg()[0]:.2f}")
    impls = {
        "chunked": jax.jit(lambda q, k, v, s: lightning_attention(q, k, v, s, block_size=args.chunk, impl="xla")),
        "naive": jax.jit(lightning_attention_naive),
        "sequential": jax.jit(lightning_attention_sequential),
    }
    limits = {"chunked": 131072, "naive": 8192, "sequential": 32768}
    print(f"{'T':>7} | " + " | ".join(f"{n:>24}" for n in impls) + " | chunked vs naive, vs seq")
    print(f"{'':>7} | " + " | ".join(f"{'us/token   GFLOP/s':>24}" for _ in impls))
    per_token = {}
    for t in [1024, 2048, 4096, 8192, 16384, 32768, 131072]:
        q, k, v, s = inputs(b, t, h, d, jnp.float32)
        row, per = [], {}
        for name, fn in impls.items():
            if t > limits[name]:
                row.append(f"{'-':>24}")
                continue
            best, _ = bench(fn, q, k, v, s, reps=3)
            per[name] = best
            gfs = flops(name, t, d, args.chunk) * b * h / best / 1e9
            row.append(f"{best / t * 1e6:>11.3f} {gfs:>12.1f}")
        ratio = " ".join(f"{per[n] / per['chunked']:.1f}x" if n in per else "-" for n in ("naive", "sequential"))
        print(f"{t:>7} | " + " | ".join(row) + f" | {ratio}")
        per_token[t] = {n: v / t for n, v in per.items()}
    growth = lambda n, a, b: per_token[b][n] / per_token[a][n]  # noqa: E731
    print(f"time/token growth, chunked: 1K->8K {growth('chunked', 1024, 8192):.2f}x, 8K->128K "
          f"{growth('chunked', 8192, 131072):.2f}x (16x longer); naive 1K->8K {growth('naive', 1024, 8192):.1f}x; "
          f"sequential 1K->32K {growth('sequential', 1024, 32768):.2f}x")
    x = jnp.ones((1 << 26,), jnp.float32)
    bw = 2 * x.nbytes / bench(jax.jit(lambda x: x * 2.0), x, reps=5)[0] / 1e9
    print(f"(DRAM bandwidth of this machine, read+write of 256 MiB: {bw:.1f} GB/s; q,k,v,o fall out of cache "
          f"beyond ~4K tokens here, which is the step in every column)")
    # 1M tokens: state passing keeps memory linear in T (no T x T matrix anywhere). XLA's buffer
    # assignment gives the exact bytes the compiled program needs beyond its inputs.
    fn = jax.jit(lambda q, k, v, s: lightning_attention(q, k, v, s, block_size=args.chunk, impl="xla"))
    print(f"\nmemory of the compiled forward (heads {args.long_heads}, head_dim {d}):")
    for t in (args.long // 16, args.long // 4, args.long):
        shapes = [jax.ShapeDtypeStruct((1, t, args.long_heads, d), jnp.float32)] * 3
        ma = fn.lower(*shapes, jax.ShapeDtypeStruct((args.long_heads,), jnp.float32)).compile().memory_analysis()
        extra = ma.temp_size_in_bytes + ma.output_size_in_bytes
        print(f"  T={t:>8}: outputs+temporaries {extra / 2**20:8.1f} MiB = {extra / t:.0f} bytes/token "
              f"(inputs {ma.argument_size_in_bytes / 2**20:.0f} MiB)")
    t = args.long
    q, k, v, s = inputs(1, t, args.long_heads, d, jnp.float32)
    t0 = time.perf_counter()
    o, st = jax.block_until_ready(fn(q, k, v, s))
    dt = time.perf_counter() - t0
    print(f"1M-token forward ran: T={t}, {dt:.1f}s incl. compile ({dt / t * 1e6:.2f} us/token); "
          f"a T x T score matrix would need {t * t * 4 / 2**40:.1f} TiB per head.")
    assert np.isfinite(np.asarray(o[0, -1])).all()


def gpu_main(args):
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    dev = jax.devices()[0]
    print(f"GPU: {dev.device_kind}; jax {jax.__version__}, torch {torch.__version__}; bf16, head_dim {args.head_dim}")
    d = args.head_dim
    jax_fns = {
        "pallas": lambda q, k, v, s: lightning_attention(q, k, v, s, impl="pallas"),
        "xla": lambda q, k, v, s: lightning_attention(q, k, v, s, impl="xla", block_size=64),
    }

    def fwd_bwd(fn):
        def loss(q, k, v, s):
            o, st = fn(q, k, v, s)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def torch_time(f, reps=20):
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            e.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(e) / 1e3)
        return min(ts)

    print(f"{'B x T x H':>16} | {'pallas fwd':>10} {'xla fwd':>9} {'fla fwd':>9} | {'pallas f+b':>10} {'xla f+b':>9} "
          f"{'fla f+b':>9} | xla/pallas fwd, fla/pallas fwd, xla/pallas f+b, fla/pallas f+b   (ms)")
    for b, t, h in args.gpu_shapes:
        q, k, v, s = inputs(b, t, h, d, jnp.bfloat16)
        res = {}
        for name, fn in jax_fns.items():
            res[name + "_f"] = bench(jax.jit(fn), q, k, v, s, reps=10)[0]
            res[name + "_fb"] = bench(fwd_bwd(fn), q, k, v, s, reps=10)[0]
        tq, tk, tv = (torch.from_numpy(np.array(x.astype(jnp.float32))).cuda().bfloat16() for x in (q, k, v))
        g = -torch.from_numpy(np.asarray(s)).cuda().float()
        f = lambda: chunk_simple_gla(tq, tk, tv, g_gamma=g, scale=1.0, output_final_state=True)  # noqa: E731
        o_fla, st_fla = f()
        # Cross-check the math against the independent implementation.
        o_p, st_p = jax.jit(jax_fns["pallas"])(q, k, v, s)
        err = float(np.abs(o_fla.float().cpu().numpy() - np.asarray(o_p, np.float32)).max())
        scale = float(np.abs(np.asarray(o_p, np.float32)).max())
        res["fla_f"] = torch_time(f)
        tq2, tk2, tv2 = (x.clone().requires_grad_() for x in (tq, tk, tv))

        def fb():
            o, st = chunk_simple_gla(tq2, tk2, tv2, g_gamma=g, scale=1.0, output_final_state=True)
            (o.float().sum() + st.sum()).backward()

        res["fla_fb"] = torch_time(fb)
        ms = {k: v * 1e3 for k, v in res.items()}
        print(f"{b:>3} x {t:>6} x {h:>3} | {ms['pallas_f']:>10.3f} {ms['xla_f']:>9.3f} {ms['fla_f']:>9.3f} | "
              f"{ms['pallas_fb']:>10.3f} {ms['xla_fb']:>9.3f} {ms['fla_fb']:>9.3f} | "
              f"{res['xla_f'] / res['pallas_f']:.2f}x {res['fla_f'] / res['pallas_f']:.2f}x "
              f"{res['xla_fb'] / res['pallas_fb']:.2f}x {res['fla_fb'] / res['pallas_fb']:.2f}x   "
              f"(max |pallas - fla| = {err:.3g} of {scale:.3g})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64, help="block size of the XLA chunked path")
    p.add_argument("--long", type=int, default=1 << 20)
    p.add_argument("--long_heads", type=int, default=2)
    p.add_argument("--gpu_shapes", default="8x1024x16,4x4096x16,2x8192x32,1x32768x32",
                   help="comma-separated BATCHxSEQxHEADS for --gpu")
    a = p.parse_args()
    a.gpu_shapes = [tuple(int(x) for x in s.split("x")) for s in a.gpu_shapes.split(",")]
    if a.gpu and a.head_dim == 64:
        a.head_dim = 128
    gpu_main(a) if a.gpu else cpu_main(a)
