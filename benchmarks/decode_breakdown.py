"""Where a CPU decode step goes: the full step vs the same step with the experts' MLPs skipped and/or
greedy instead of top-p sampling, measured in one process, alternating, best of 3 rounds.

    python benchmarks/decode_breakdown.py [--batches=8,32] [--new_tokens=256]

The difference "full - no experts" is the experts' cost; dividing the expert weight bytes by it
gives the rate at which the step streams them (compare with the DRAM read rate it prints).
Skipping the experts is done by swapping m1jax.model.cpu.expert_mlp_cpu for a stand-in (this
script only); the routing and everything else still run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import m1jax.model.cpu as cpu  # noqa: E402
from m1jax.rollout import SamplingParams, generate  # noqa: E402
from rollout import as_m1jax, expert_weight_bytes, timed, tiny_hf_model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="8,32")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    model = as_m1jax(tiny_hf_model())
    cfg = model.cfg
    expert_bytes = expert_weight_bytes(cfg)
    x = jnp.ones((1 << 26,), jnp.float32)
    total = jax.jit(jnp.sum)
    print(f"DRAM read {x.nbytes / timed(lambda: total(x), reps=5) / 1e9:.1f} GB/s; expert weights "
          f"{expert_bytes / 2**20:.0f} MiB of {4 * cfg.param_count() / 2**20:.0f} MiB; "
          f"CPU {os.cpu_count()} threads")
    full = cpu.expert_mlp_cpu
    skip = lambda x, ids, w, w1, w3, w2: x.astype(jnp.float32) * w[:, :1]  # noqa: E731 -- keeps the routing live
    variants = {"full step": (full, False), "no experts": (skip, False), "greedy": (full, True),
                "no experts, greedy": (skip, True)}
    for b in [int(v) for v in a.batches.split(",")]:
        prompts = np.random.default_rng(b).integers(1, cfg.vocab_size, size=(b, 32)).tolist()
        best = {}
        for _ in range(a.rounds):
            for name, (fn, greedy) in variants.items():
                cpu.expert_mlp_cpu = fn
                jax.clear_caches()
                sp = SamplingParams(temperature=1.0, top_p=0.95, greedy=greedy, max_new_tokens=a.new_tokens)
                run = lambda: generate(model, prompts, sp, key=jax.random.key(0)).tokens  # noqa: E731
                run()  # compile
                best[name] = min(best.get(name, 1e9), timed(run) / a.new_tokens)
        cpu.expert_mlp_cpu = full
        experts = best["full step"] - best["no experts"]
        print(f"batch {b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in best.items()))
        print(f"  experts {experts * 1e3:.2f} ms/step ({expert_bytes / experts / 1e9:.1f} GB/s of expert "
              f"weights); top-p sampling {(best['full step'] - best['greedy']) * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
