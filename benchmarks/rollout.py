"""Rollout throughput: m1jax vs transformers generate() on the same tiny MiniMax weights, and
m1jax decode time per token at a short vs a long context. Measured side by side in one run.

    python benchmarks/rollout.py [--new_tokens=256] [--batches=8,32] [--contexts=1024,32768]

RL's long-tailed completion lengths: continuous batching (the slot engine) vs static batching on
the same engine and slots, and vs transformers' generate (static batches of as many rows):

    python benchmarks/rollout.py --workload=longtail [--slots=32] [--no_hf]

256 samples (32 prompts x 8) with lengths drawn log-normal (median 64, 5% at >= 8x the median,
capped at 1024; seed 0), enforced through per-sample limits (no stop token), so any model makes
this workload. Useful tokens/s counts the samples' tokens; slot occupancy is busy slot-steps over
all slot-steps. The last line is the continuous/static ratio.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from m1jax.checkpoints import hf  # noqa: E402
from m1jax.model.config import LINEAR  # noqa: E402
from m1jax.rollout import SamplingParams, generate  # noqa: E402


def tiny_hf_model():
    """configs/tiny.py as a transformers model (15.3M parameters)."""
    import torch
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    torch.manual_seed(0)
    cfg = MiniMaxConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2, block_size=64,
        layer_types=["linear_attention"] * 7 + ["full_attention"], max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7},
        **{f"{k}_alpha_factor": 2.0 for k in ("full_attn", "linear_attn", "mlp")},
    )
    return MiniMaxForCausalLM(cfg).eval()


def as_m1jax(hf_model):
    """The same weights as an m1jax model, through a transformers checkpoint (m1jax.checkpoints.hf)."""
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return hf.load(d)


def expert_weight_bytes(cfg):
    """Bytes of all layers' fp32 expert matrices (w1, w3, w2)."""
    return 4 * cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size


def timed(fn, reps=2):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def longtail_lengths(n: int = 256, median: int = 64, cap: int = 1024, seed: int = 0):
    """n lengths, log-normal with the median and 5% at >= 8x it (sigma = ln 8 / 1.645), in [1, cap]."""
    sigma = np.log(8) / 1.6449
    x = np.random.default_rng(seed).lognormal(np.log(median), sigma, size=n)
    return np.clip(np.round(x), 1, cap).astype(np.int64)


def hf_longtail(hf_model, prompts, limits, rows: int):
    """transformers generate() on the workload in static batches of ``rows`` samples (in order),
    each sample stopping at its limit (a per-row stopping criterion): (seconds, useful tokens)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AtLimit(StoppingCriteria):
        def __init__(self, start, limit):
            self.start, self.limit = start, torch.tensor(limit)

        def __call__(self, input_ids, scores, **kw):
            return (input_ids.shape[1] - self.start) >= self.limit

    t, useful = time.perf_counter(), 0
    for b in range(0, len(prompts), rows):
        batch, lim = prompts[b:b + rows], limits[b:b + rows]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, do_sample=True, top_p=0.95,
                                    max_new_tokens=int(lim.max()), pad_token_id=0, eos_token_id=None,
                                    stopping_criteria=StoppingCriteriaList([AtLimit(width, lim.tolist())]))
        assert out.shape[1] - width == lim.max()
        useful += int(lim.sum())
    return time.perf_counter() - t, useful


def longtail(a, hf_model, model):
    from m1jax.rollout import generate_slots

    g, cap = 8, 1024
    limits = longtail_lengths(cap=cap).reshape(-1, g)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 512, size=rng.integers(16, 49)).tolist() for _ in range(len(limits))]
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=cap)
    flat = limits.reshape(-1)
    print(f"longtail: {flat.size} samples ({len(prompts)} prompts x {g}), lengths median {np.median(flat):.0f}, "
          f"mean {flat.mean():.1f}, {np.mean(flat >= 8 * 64) * 100:.1f}% >= 512, max {flat.max()}, "
          f"{flat.sum()} tokens; {a.slots} slots")
    run = functools.partial(generate_slots, model, prompts, sp, g, slots=a.slots, max_new_tokens=limits,
                            key=jax.random.key(0))
    small = functools.partial(generate_slots, model, prompts[:2], sp, g, slots=a.slots, max_new_tokens=limits[:2],
                              prompt_width=64, key=jax.random.key(0))
    small(), small(continuous=False)  # compile both modes' programs (the same shapes as the runs)
    res = {}
    for mode in ("continuous", "static", "continuous", "static"):  # interleaved: a slow spell hits both
        t = time.perf_counter()
        r = run(continuous=mode == "continuous", prompt_width=64)
        dt = time.perf_counter() - t
        assert int(r.rollout.lengths.sum()) == flat.sum() == r.busy_steps
        if mode not in res or dt < res[mode][0]:
            res[mode] = (dt, r)
    same = all(np.array_equal(getattr(res["continuous"][1].rollout, f), getattr(res["static"][1].rollout, f))
               for f in ("tokens", "logprobs", "lengths", "finish_reason"))
    print(f"{'engine':>26} | {'useful tok/s':>12} | {'seconds':>7} | {'slot occupancy':>14} | segments")
    for mode, (dt, r) in res.items():
        print(f"{'m1jax ' + mode:>26} | {flat.sum() / dt:>12,.0f} | {dt:>7.2f} | {r.occupancy:>14.3f} | {r.segments}")
    if hf_model is not None:
        import torch

        torch.manual_seed(0)
        rows = [p for p in prompts for _ in range(g)]
        dt, useful = hf_longtail(hf_model, rows, flat, a.slots)
        steps = sum(flat[b:b + a.slots].max() for b in range(0, flat.size, a.slots)) * a.slots
        print(f"{'transformers (static)':>26} | {useful / dt:>12,.0f} | {dt:>7.2f} | {useful / steps:>14.3f} | "
              f"{-(-flat.size // a.slots)} batches")
        print(f"continuous vs transformers useful tokens/s: {dt / res['continuous'][0]:.2f}x")
    print(f"continuous and static samples identical: {same}")
    print(f"longtail continuous/static useful tokens/s: {res['static'][0] / res['continuous'][0]:.2f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=("throughput", "longtail"), default="throughput")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--no_hf", action="store_true", help="longtail: skip transformers")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--contexts", default="1024,32768")
    p.add_argument("--decode_steps", type=int, default=64)
    a = p.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    hf_model = tiny_hf_model()
    model = as_m1jax(hf_model)
    if a.workload == "longtail":
        print(f"tiny MiniMax ({model.cfg.param_count():,} params), top-p 0.95, CPU {os.cpu_count()} threads, "
              f"loadavg {os.getloadavg()[0]:.2f}")
        return longtail(a, None if a.no_hf else hf_model, model)
    print(f"tiny MiniMax ({model.cfg.param_count():,} params), prompt {a.prompt}, {a.new_tokens} new tokens, "
          f"top-p 0.95, CPU {os.cpu_count()} threads, loadavg {os.getloadavg()[0]:.2f}")
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=a.new_tokens)
    # Every decode step of any implementation reads every weight at least once (at batch >= 2 all
    # experts are hit): weight bytes / DRAM bandwidth bounds the step time from below.
    x = jax.numpy.ones((1 << 26,), jax.numpy.float32)
    total = jax.jit(jax.numpy.sum)
    bw = x.nbytes / timed(lambda: total(x), reps=5) / 1e9  # streaming read of 256 MiB
    cfg = model.cfg
    weight_bytes = 4 * cfg.param_count()
    step_floor = weight_bytes / (bw * 1e9)
    # at batch 1 only the token's top-k experts need reading (the CPU experts gather just those)
    batch1_bytes = weight_bytes - expert_weight_bytes(cfg) * (1 - cfg.num_experts_per_tok / cfg.num_experts)
    print(f"DRAM read {bw:.1f} GB/s; fp32 weights {weight_bytes / 2**20:.0f} MiB -> any decode step >= "
          f"{step_floor * 1e3:.1f} ms (the bound column: tokens/s if a step cost only that)")
    print(f"{'batch':>6} | {'m1jax tok/s':>12} | {'transformers tok/s':>18} | ratio | {'bound tok/s':>11}")
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = np.random.default_rng(b).integers(1, 512, size=(b, a.prompt))
        ours = timed(lambda: generate(model, prompts.tolist(), sp, key=jax.random.key(0)).tokens)
        ids = torch.tensor(prompts)
        with torch.no_grad():
            def run_hf():
                return hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                         max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                         pad_token_id=0)
            theirs = timed(run_hf, reps=2)  # best of 2: the first call also warms torch up
        n = b * a.new_tokens
        print(f"{b:>6} | {n / ours:>12,.0f} | {n / theirs:>18,.0f} | {theirs / ours:>4.1f}x | {b / step_floor:>11,.0f}")
    print(f"\ndecode time per token (batch 1, {a.decode_steps} steps after the prefill), m1jax:")
    from flax import nnx

    from m1jax.rollout.engine import decode, prefill

    graphdef, state = nnx.split(model)
    sp = SamplingParams(greedy=True, max_new_tokens=a.decode_steps)
    runs = [(int(x), kv) for kv in (None, "bfloat16") for x in a.contexts.split(",")]
    steps, t_pre = {}, {}
    for ctx, kv_dtype in runs:
        ids = jax.numpy.asarray(np.random.default_rng(ctx).integers(1, 512, size=(1, ctx)), jax.numpy.int32)
        mask = jax.numpy.ones_like(ids)
        t = time.perf_counter()
        last, cache, n_real, _ = jax.block_until_ready(
            prefill(graphdef, state, ids, mask, a.decode_steps, min(ctx, 2048), kv_dtype))
        t_pre[ctx, kv_dtype] = time.perf_counter() - t  # includes compiling the prefill
        steps[ctx, kv_dtype] = functools.partial(  # decode leaves the cache intact: rerunnable
            decode, graphdef, state, cache, last, n_real, ctx, jax.random.key(0), sp, 1)
        jax.block_until_ready(steps[ctx, kv_dtype]().tokens)  # compile
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(3):  # interleaved rounds: a slow spell of this machine hits every context alike
        for run in runs:
            best[run] = min(best[run], timed(lambda: steps[run]().tokens, reps=1))  # noqa: B023
    for ctx, kv_dtype in runs:
        per = best[ctx, kv_dtype] / a.decode_steps
        first = best[runs[0][0], kv_dtype] / a.decode_steps
        kv = 2 * cfg.num_kv_heads * (ctx + a.decode_steps) * cfg.head_dim * (2 if kv_dtype else 4) / 2**20
        floor = (batch1_bytes + kv * 2**20) / (bw * 1e9)
        print(f"  context {ctx:>6}{' bf16 KV' if kv_dtype else ''}: {per * 1e3:.2f} ms/token ({per / first:.2f}x the first "
              f"context); prefill+compile {t_pre[ctx, kv_dtype]:.1f}s; KV cache of the one softmax layer {kv:.1f} MiB, "
              f"lightning states {cfg.layer_types.count(LINEAR) * cfg.num_heads * cfg.head_dim ** 2 * 4 / 2**20:.1f} MiB; bound (the "
              f"{batch1_bytes / 2**20:.0f} MiB of weights a token uses + KV, read once) {floor * 1e3:.1f} ms "
              f"({floor / (batch1_bytes / (bw * 1e9)):.2f}x the weights alone)")


if __name__ == "__main__":
    main()
