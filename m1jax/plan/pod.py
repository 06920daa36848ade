"""Plan a TPU pod run: compile the real train / prefill / decode programs for a TPU slice ahead of
time, on this (CPU) machine, and report whether they fit the chips' HBM.

    python -m m1jax.plan --config=configs/minimax_m1.py --topology=v5p-512 \\
        --mesh.fsdp=4 --mesh.expert=8 --mesh.tensor=8 --program=all --batch=32 --seq_len=49152 --context=1048576

Needs libtpu (``pip install -e ".[tpu]"``); no TPU. For each program it prints the compile time,
the per-chip peak memory against HBM, the memory_analysis fields and the largest arguments, the
per-chip FLOPs and bytes from cost_analysis, and the Pallas (Mosaic) lightning kernels in the
compiled HLO. Exit status: 0 when every program fits; 1 when one does not (the compiler's
out-of-memory message is printed with the next mesh or slice to try); 2 for invalid arguments.

Sizes (defaults from the config file): ``--batch`` sequences of ``--seq_len`` tokens per train
step (paper: prompt + 40K generated tokens); ``--rollout_batch`` sequences with a cache of
``--context`` columns, ``--prompt_len`` of them prefilled ``--prefill_chunk`` at a time.
``--model.KEY=VALUE`` overrides a model config field (e.g. ``--model.moe_capacity_factor=1.25``).
Mesh axes not given: expert = gcd(num_experts, chips), fsdp = the rest.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import re
import sys

from m1jax.model.config import LINEAR

GiB = 2**30
PROGRAMS = ("train", "prefill", "decode")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m m1jax.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/minimax_m1.py", help="config file (get_config())")
    p.add_argument("--topology", required=True, help="v5p-N, v6e-N, v5e-N, v4-N, or a libtpu name like v5:2x2x1")
    for axis in ("data", "fsdp", "expert", "sequence", "tensor"):
        p.add_argument(f"--mesh.{axis}", type=int, default=None, dest=f"mesh_{axis}")
    p.add_argument("--mesh", default=None, help="'auto': choose the mesh from an analytic per-chip memory estimate, "
                   "compile it, and try the next candidate on out-of-memory")
    p.add_argument("--max_tries", type=int, default=4, help="meshes --mesh=auto compiles at most")
    p.add_argument("--program", default="all", choices=PROGRAMS + ("all",))
    p.add_argument("--batch", type=int, default=None, help="train sequences per step (default: one per data-parallel rank)")
    p.add_argument("--seq_len", type=int, default=None, help="train tokens per sequence (default: prompt_len + max_new_tokens)")
    p.add_argument("--rollout_batch", type=int, default=None, help="sequences sampled at once (default: --batch's default)")
    p.add_argument("--context", type=int, default=None, help="cache columns (default: prompt_len + max_new_tokens)")
    p.add_argument("--prompt_len", type=int, default=None, help="prompt tokens (default: rollout.max_prompt_len)")
    p.add_argument("--prefill_chunk", type=int, default=None, help="prefill columns per step (default: min(2048, prompt_len))")
    p.add_argument("--top", type=int, default=4, help="largest arguments to list")
    p.add_argument("--print_config", action="store_true", help="print the config file's resolved config and exit")
    args, rest = p.parse_known_args(argv)
    overrides = {}
    for item in rest:
        m = re.fullmatch(r"--model\.(\w+)=(.*)", item)
        if not m:
            p.error(f"unrecognized argument {item!r} (model fields are set with --model.KEY=VALUE)")
        try:
            overrides[m.group(1)] = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            overrides[m.group(1)] = m.group(2)
    return p, args, overrides


def default_mesh(n: int, num_experts: int, given: dict):
    """Fill the mesh axes not given for ``n`` chips: expert = gcd(num_experts, chips left) (all of
    them when fsdp is given), fsdp = the rest, data = tensor = 1. Sizes that do not multiply to n
    are caught by ``aot.mesh_for``."""
    from m1jax.sharding import MeshConfig

    sizes = {k: v for k, v in given.items() if v is not None}
    left = max(1, n // math.prod(sizes.values()))
    if "expert" not in sizes:
        sizes["expert"] = left if "fsdp" in sizes else math.gcd(num_experts, left)
        left //= sizes["expert"]
    sizes.setdefault("fsdp", left)
    return MeshConfig.from_dict(sizes)


def next_slice(topology: str) -> str | None:
    m = re.fullmatch(r"(v5p|v4|v6e|v5e)-(\d+)", topology)
    return f"{m.group(1)}-{2 * int(m.group(2))}" if m else None


def suggestion(mc, program: str, state_bytes: float, hbm: float, cfg, topology: str) -> str:
    """The next thing to try after an out-of-memory plan, as command-line flags."""
    bigger = next_slice(topology)
    bigger_txt = f"a bigger slice (--topology={bigger})" if bigger else "a bigger slice"
    if program == "train" and state_bytes > 0.5 * hbm:
        if mc.data > 1:
            return (f"the float32 weights and AdamW moments take {state_bytes / GiB:.1f} GiB per chip: shard them "
                    f"over the data axis too (--mesh.data={mc.data // 2} --mesh.fsdp={mc.fsdp * 2}) or use {bigger_txt}")
        return f"the float32 weights and AdamW moments take {state_bytes / GiB:.1f} GiB per chip: use {bigger_txt}"
    donor = "data" if mc.data > 1 else "fsdp" if mc.fsdp > 1 else None
    t2 = mc.tensor * 2
    # Doubling tensor helps while it divides the heads (and, for the KV cache, the KV heads).
    splits = cfg.num_heads % t2 == 0 and (program == "train" or cfg.num_kv_heads % t2 == 0)
    if donor and splits:
        flags = f"--mesh.{donor}={getattr(mc, donor) // 2} --mesh.tensor={t2}"
        return (f"activations do not fit: split heads, expert MLP width and vocabulary over more chips ({flags}, "
                f"with --batch / --rollout_batch halved: sequences are split over data x fsdp x expert), or "
                f"{bigger_txt}")
    what = "--batch" if program == "train" else "--rollout_batch or --context"
    chunk = "" if cfg.moe_chunk else " or --model.moe_chunk=8192 (the experts take a device's tokens a chunk at a time),"
    return f"activations do not fit: a smaller {what} (per chip),{chunk} or {bigger_txt}"


# Names of the programs' positional arguments (see m1jax.plan.aot.lower_*); train's state is (model, optimizer).
ARG_NAMES = {
    "train": (("model", "optimizer"), "ids", "completion_mask", "old_logp", "advantages", "weights"),
    "prefill": ("model", "ids", "mask"),
    "decode": ("model", "cache", "last_logits", "n_real"),
}


def _leaf_name(program: str, path) -> str:
    import jax

    keys = [jax.tree_util.keystr((k,)).strip("[]'.") for k in path]
    names = ARG_NAMES[program][int(keys[0])]
    if isinstance(names, tuple):
        names, keys = names[int(keys[1])], keys[1:]
    return ".".join([names] + [k for k in keys[1:] if k not in ("value", "raw_value")])


def describe_args(program: str, args, top: int) -> list[str]:
    """Per-chip argument bytes by group (model, optimizer, cache, ...) and the ``top`` largest arguments."""
    import jax

    from m1jax.plan.aot import per_device_bytes

    rows = sorted(((per_device_bytes(x), _leaf_name(program, p), x) for p, x in jax.tree_util.tree_leaves_with_path(args)),
                  key=lambda r: -r[0])
    groups: dict[str, int] = {}
    for b, name, _ in rows:
        group = name.split(".")[0]
        groups[group] = groups.get(group, 0) + b
    lines = ["by group: " + ", ".join(f"{g} {b / GiB:.2f} GiB" for g, b in sorted(groups.items(), key=lambda kv: -kv[1]))]
    return lines + [f"{b / GiB:8.2f} GiB  {name} {x.dtype}{list(x.shape)}, per chip {list(x.sharding.shard_shape(x.shape))}"
                    for b, name, x in rows[:top]]


def _report(c, hbm: float | None, cfg) -> bool:
    fits = hbm is None or c.peak <= hbm
    hbm_txt = f" / HBM {hbm / GiB:.2f} GiB" if hbm else ""
    verdict = "" if hbm is None else (f": fits (margin {(hbm - c.peak) / GiB:.2f} GiB)" if fits else ": DOES NOT FIT")
    print(f"  compiled in {c.seconds:.1f} s")
    print(f"  peak {c.peak / GiB:.2f} GiB per chip{hbm_txt}{verdict}")
    fields = sorted(((v, k) for k, v in c.memory.items() if v), reverse=True)
    print("  memory_analysis (per chip): " + ", ".join(f"{k.replace('_size_in_bytes', '')} {v / GiB:.2f} GiB"
                                                      for v, k in fields))
    print(f"  cost_analysis (per chip): {c.flops:.4g} flops, {c.bytes_accessed:.4g} bytes accessed")
    comms = c.collectives
    if comms:
        print("  collectives in the HLO (per chip; a loop body once): " + ", ".join(
            f"{k} x{n} {b / GiB:.2f} GiB" for k, (n, b) in sorted(comms.items())))
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(c.lightning_kernels.items())) or "none"
    print(f"  lightning: {cfg.lightning_impl} ({cfg.pallas_backend}); Pallas kernels in the compiled HLO: {kernels}")
    if not c.lightning_kernels and any(t == LINEAR for t in cfg.layer_types):
        print("  ERROR: the compiled program does not call the Pallas lightning kernel (XLA fallback)")
        return False
    return fits


def auto_meshes(cfg, chips: int, batch: int, seq_len: int, hbm: float) -> list:
    """Candidate (estimate, MeshConfig) pairs for a train step of ``batch`` x ``seq_len`` tokens on
    ``chips``, with the analytic per-chip estimate of ``m1jax.plan.memory.plan`` (parameters, gradients and AdamW moments
    exact; activations estimated), in the order to try: those estimated to fit ``hbm`` (with 10%
    for what the estimate leaves out) first, least sequence and tensor parallelism first (the axes
    that communicate inside a layer), then most expert parallelism (a chip keeps its experts'
    weights instead of gathering them over fsdp), then by estimate; then the rest by estimate.
    data = 1 (fsdp shards the state where data only copies it); expert divides the experts and
    tensor the heads, each up to 8; sequence divides the length; the batch axes divide the batch."""
    from m1jax.plan.memory import plan as estimate
    from m1jax.sharding import MeshConfig

    def divisors(n, limit):
        return [d for d in range(1, min(n, limit) + 1) if n % d == 0 and chips % d == 0 and d & (d - 1) == 0]

    found = []
    for tensor in divisors(cfg.num_heads, 8):
        for expert in divisors(cfg.num_experts, 8):
            for sequence in divisors(seq_len, 64):
                rest, rem = divmod(chips, tensor * expert * sequence)
                if rem or batch % (rest * expert) or rest * expert > batch:
                    continue
                mc = MeshConfig(fsdp=rest, expert=expert, sequence=sequence, tensor=tensor)
                found.append((estimate(cfg, mc, batch, seq_len)["total"], mc))
    order = lambda r: (r[1].sequence * r[1].tensor, r[1].sequence, -r[1].expert, r[0])  # noqa: E731
    fits = sorted((r for r in found if r[0] <= 0.9 * hbm), key=order)
    return fits + sorted((r for r in found if r[0] > 0.9 * hbm), key=lambda r: r[0])


# Compile-only: libtpu reads these when its backend starts, and they keep it from probing for a TPU
# host. main() restores them after, so that what its caller launches later (train.py in a
# subprocess, say) does not take this machine for a TPU host.
_COMPILE_ONLY_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"}


def main(argv=None) -> int:
    saved = {k: os.environ.get(k) for k in _COMPILE_ONLY_ENV}
    for k, v in _COMPILE_ONLY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        return _main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(argv) -> int:
    parser, a, overrides = _parse(sys.argv[1:] if argv is None else argv)

    from m1jax import cli
    from m1jax.plan import aot
    from m1jax.configs import load_config_file, model_config
    from m1jax.model.config import ConfigError, ModelConfig
    from m1jax.optim import OptimConfig
    from m1jax.rollout.sampling import SamplingParams
    from m1jax.sharding import AXES, MeshError, validate_model_for_mesh

    try:
        config = load_config_file(a.config)
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            hint = cli.nearest(unknown[0], sorted(fields))
            raise ConfigError(f"--model.{unknown[0]}: not a model field; "
                              + (f"did you mean --model.{hint}?" if hint else f"the fields are {sorted(fields)}."))
        if a.print_config:
            cli.print_config(config)
            return 0
        cfg = aot.tpu_config(model_config(config).replace(**overrides))
        optim = OptimConfig.from_dict(config.rl_optim.to_dict(), "rl_optim") if "rl_optim" in config else OptimConfig()
        sampling = SamplingParams(**config.sampling.to_dict()) if "sampling" in config else SamplingParams()
        devices = aot.tpu_devices(a.topology)
        hbm = aot.HBM_BYTES.get(devices[0].device_kind)
        given = {ax: getattr(a, f"mesh_{ax}") for ax in AXES}
        prompt = a.prompt_len or (config.rollout.max_prompt_len if "rollout" in config else 1024)
        seq_len = a.seq_len or prompt + sampling.max_new_tokens
        if a.mesh not in (None, "auto"):
            raise aot.PlanError(f"--mesh={a.mesh!r}: the only value is 'auto' (set axes with --mesh.AXIS=N).")
        if a.mesh == "auto":
            if any(v is not None for v in given.values()):
                raise aot.PlanError("--mesh=auto chooses every axis: drop the --mesh.* flags (or --mesh=auto).")
            if not a.batch:
                raise aot.PlanError("--mesh=auto needs --batch (the meshes it may choose split the batch differently).")
            ranked = auto_meshes(cfg, len(devices), a.batch, seq_len, hbm or math.inf)
            estimates = {mc: est for est, mc in ranked}
            candidates = [mc for _, mc in ranked]
            if not candidates:
                raise aot.PlanError(f"--mesh=auto: no mesh of {len(devices)} chips splits --batch={a.batch} "
                                    f"and --seq_len={seq_len}; use a batch that is a power of two.")
        else:
            candidates = [default_mesh(len(devices), cfg.num_experts, given)]
        runs = []
        for mc in candidates:
            mesh = aot.mesh_for(devices, mc)
            validate_model_for_mesh(cfg, mc)
            dp = mc.data * mc.fsdp * mc.expert
            shapes = aot.Shapes(
                train_batch=a.batch or dp,
                seq_len=seq_len,
                rollout_batch=a.rollout_batch or a.batch or dp,
                context=a.context or prompt + sampling.max_new_tokens,
                prompt_len=prompt,
                prefill_chunk=a.prefill_chunk or min(2048, prompt),
            )
            aot.validate_shapes(shapes, dp)
            runs.append((mc, mesh, shapes))
    except (aot.PlanError, ConfigError, MeshError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")

    kind = devices[0].device_kind
    print(f"plan: {a.config} ({cfg.param_count():,} parameters) on {a.topology} = {aot.topology_name(a.topology)}: "
          f"{len(devices)} x {kind}, HBM {'unknown' if hbm is None else f'{hbm / GiB:.2f} GiB'} per chip")
    programs = PROGRAMS if a.program == "all" else (a.program,)
    if a.mesh == "auto":
        print(f"mesh auto: {len(runs)} candidates; trying up to {a.max_tries}, in order:")
        for mc, _, _ in runs[:a.max_tries]:
            print(f"  {dict(zip(AXES, mc.shape))}: estimated {estimates[mc] / GiB:.1f} GiB per chip")
    for mc, mesh, shapes in runs[:a.max_tries]:
        failed, peaks = _plan_mesh(a, cfg, optim, sampling, mc, mesh, shapes, programs, hbm)
        if a.mesh == "auto":
            if not failed:
                print(f"\nmesh auto: chose {dict(zip(AXES, mc.shape))}, peak "
                      + ", ".join(f"{p} {v / GiB:.2f} GiB" for p, v in peaks.items()) + " per chip")
                return 0
            print(f"\nmesh auto: {dict(zip(AXES, mc.shape))} does not fit ({', '.join(failed)}); next candidate")
    if a.mesh == "auto":
        print(f"\nmesh auto: none of the {min(len(runs), a.max_tries)} meshes tried fits")
        return 1
    return 1 if failed else 0


def _plan_mesh(a, cfg, optim, sampling, mc, mesh, shapes, programs, hbm):
    """Compile ``programs`` on one mesh and report each; returns (programs that do not fit, peaks)."""
    import jax

    from m1jax.plan import aot
    from m1jax.sharding import AXES

    dp = mc.data * mc.fsdp * mc.expert
    print(f"\nmesh: {dict(zip(AXES, mc.shape))}; remat={cfg.remat}, remat_layers={cfg.remat_layers}, "
          f"dtype={cfg.dtype}, params {cfg.param_dtype}, moe_capacity_factor={cfg.moe_capacity_factor}, "
          f"moe_chunk={cfg.moe_chunk}, attention_chunk={cfg.attention_chunk}")
    for note in aot.sharding_notes(cfg, mesh):
        print(f"note: {note}")
    failed, peaks = [], {}
    for program in programs:
        if program == "train":
            per_rank = shapes.train_batch / dp
            split = f", each split over sequence={mc.sequence}" if mc.sequence > 1 else ""
            title = (f"train (CISPO step, AdamW on float32 master weights): {shapes.train_batch} x {shapes.seq_len} "
                     f"tokens, {per_rank:g} sequence(s) per data-parallel rank{split}")
            lowered, args = aot.lower_train(cfg, optim, mesh, shapes)
        elif program == "prefill":
            title = (f"prefill: {shapes.rollout_batch} x {shapes.prompt_len} prompt tokens into a cache of "
                     f"{shapes.context} columns, {shapes.prefill_chunk} at a time")
            lowered, args = aot.lower_prefill(cfg, mesh, shapes)
        else:
            title = (f"decode: {shapes.rollout_batch} sequences, cache of {shapes.context} columns, "
                     f"{shapes.context - shapes.prompt_len} new tokens (one while_loop)")
            lowered, args = aot.lower_decode(cfg, mesh, shapes, sampling)
        print(f"\n{title}")
        state_bytes = sum(aot.per_device_bytes(x) for x in jax.tree.leaves(args[0]))
        try:
            c = aot.compile_lowered(program, lowered)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"  DOES NOT FIT: {str(e).strip()}")
            print(f"  try: {suggestion(mc, program, state_bytes, hbm or math.inf, cfg, a.topology)}")
            failed.append(program)
            continue
        peaks[program] = c.peak
        if not _report(c, hbm, cfg):
            failed.append(program)
        print("  arguments per chip:")
        for line in describe_args(program, args, a.top):
            print("    " + line)
    print(f"\n{'DOES NOT FIT: ' + ', '.join(failed) if failed else 'all programs fit'}")
    return failed, peaks


if __name__ == "__main__":
    sys.exit(main())
