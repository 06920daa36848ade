"""Ahead-of-time compilation of m1jax's real programs for a TPU slice, on any host (CPU included).

With libtpu installed (``pip install -e ".[tpu]"``), ``jax.experimental.topologies`` gives
compile-only TPU devices for a slice that is not there, and ``jax.jit(f).lower(args).compile()``
runs libtpu's own compiler: the result is a real TPU executable with per-chip memory and cost
analyses, and a program that does not fit fails with the compiler's RESOURCE_EXHAUSTED error.

The programs are the ones training and sampling run, built from the real modules on abstract
(``jax.ShapeDtypeStruct``) arguments placed by the sharding rules:

* ``train``:   ``m1jax.rl.steps.cispo_step`` (forward, backward, optax update of float32 master
               weights and AdamW moments; remat as configured);
* ``prefill``: ``m1jax.rollout.engine.prefill`` (fills the hybrid cache, chunk by chunk);
* ``decode``:  ``m1jax.rollout.engine.decode`` (the ``lax.while_loop`` of decode steps on a cache
               of ``context`` columns).

The lightning layers use the Pallas TPU (Mosaic) kernel: the model config is set to
``lightning_impl="pallas", pallas_backend="tpu"``; ``lightning_kernels`` counts them in the HLO.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.model.config import LINEAR
from m1jax.optim import OptimConfig, make_optimizer
from m1jax.sharding import AXES, MeshConfig, batch_spec, make_mesh, spec_for, state_shardings

GiB = 2**30
# HBM per chip as libtpu's compiler budgets it (the figure in its out-of-memory message), by device_kind.
HBM_BYTES = {"TPU v5": 95.74 * GiB, "TPU v5 lite": 15.75 * GiB, "TPU v6 lite": 31.25 * GiB, "TPU v4": 30.5 * GiB}
# Cloud TPU names -> libtpu topology generation, and TensorCores counted per chip in the name.
_GENERATIONS = {"v5p": ("v5", 3, 2), "v4": ("v4", 3, 2), "v6e": ("v6e", 2, 1), "v5e": ("v5e", 2, 1)}


class PlanError(ValueError):
    """A plan cannot be built as asked; the message names the problem and the fix."""


def topology_name(name: str) -> str:
    """'v5p-512' -> 'v5:4x8x8' (MaxText's table: chips = cores / 2 for v5p, a 3-D torus growing by
    doubling its smallest side, ties to the last); 'v6e-256' -> 'v6e:16x16'; 'v5e-256' -> 'v5e:16x16'.
    A libtpu topology string ('v5:2x2x1') is returned as is."""
    if ":" in name:
        return name
    m = re.fullmatch(r"(v5p|v4|v6e|v5e)-(\d+)", name)
    if not m:
        raise PlanError(f"topology {name!r}: use a Cloud TPU name (v5p-N, v6e-N, v5e-N, v4-N) or a libtpu "
                        "topology string such as 'v5:2x2x1'.")
    gen, dims, per_chip = _GENERATIONS[m.group(1)]
    chips = int(m.group(2)) // per_chip
    start = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(start) or chips & (chips - 1):
        raise PlanError(f"topology {name!r}: {chips} chips is not a power of two >= {math.prod(start)}; "
                        f"give the libtpu topology string instead (e.g. '{gen}:4x4x12').")
    shape = start
    while math.prod(shape) < chips:
        i = max(j for j in range(dims) if shape[j] == min(shape))
        shape[i] *= 2
    return f"{gen}:{'x'.join(map(str, shape))}"


def tpu_devices(topology: str):
    """Compile-only TPU devices of a slice (needs libtpu; no TPU hardware)."""
    # Compile-only: no chip is opened, so concurrent planners (pytest -n 2, a user's second shell)
    # need not take libtpu's one-process-per-host lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return topologies.get_topology_desc(platform="tpu", topology_name=topology_name(topology)).devices
    except (ImportError, RuntimeError) as e:
        raise PlanError(f"cannot build TPU topology {topology!r} ({e}); install libtpu beside jax: "
                        'pip install -e ".[tpu]".') from e


def tpu_config(cfg: ModelConfig) -> ModelConfig:
    """The model config compiled for TPU: lightning layers on the Pallas TPU (Mosaic) kernel.
    (moe_impl="auto" needs no override: it picks the experts' implementation when lowering.)"""
    return cfg.replace(lightning_impl="pallas", pallas_backend="tpu")


# ----------------------------------------------------------------------------- abstract arguments
def per_device_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def _abstract(value, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)


def abstract_state(make: Callable[[], Any], mesh):
    """(graphdef, state) of ``make()`` with every leaf a ShapeDtypeStruct in its rule sharding."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(state, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    state = jax.tree.map(lambda v, s: v.replace(_abstract(v.get_value(), s)), state, shardings, is_leaf=is_var)
    return graphdef, state


def _batch_spec(mesh, ndim: int) -> P:
    return P(batch_spec(mesh), *([None] * (ndim - 1)))


def batch_array(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """[batch, ...] input sharded over data x fsdp x expert."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, _batch_spec(mesh, len(shape))))


def abstract_cache(cfg: ModelConfig, mesh, batch: int, max_len: int):
    """The hybrid cache of ``MiniMaxM1.init_cache`` as sharded ShapeDtypeStructs: sequences over the
    batch axes, lightning-state heads and KV heads over tensor (when divisible)."""
    bspec = _batch_spec(mesh, 1)[0]
    tp = mesh.shape["tensor"]
    heads = "tensor" if tp > 1 and cfg.num_heads % tp == 0 else None
    kv_heads = "tensor" if tp > 1 and cfg.num_kv_heads % tp == 0 else None
    model = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    period, _, tail = cfg.pattern

    def entries(tree, types):
        out = []
        for entry, ty in zip(tree, types):
            spec = P(None, bspec, heads if ty == LINEAR else kv_heads, None, None)
            out.append({k: _abstract(v, NamedSharding(mesh, spec)) for k, v in entry.items()})
        return out

    return {
        "blocks": entries(shapes["blocks"], period),
        "tail": entries(shapes["tail"], tail) if tail else None,
        "key_valid": _abstract(shapes["key_valid"], NamedSharding(mesh, P(bspec, None))),
    }


# ----------------------------------------------------------------------------- programs
@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of the programs. Train: ``train_batch`` sequences of ``seq_len`` tokens. Rollout:
    ``rollout_batch`` sequences with a cache of ``context`` columns, of which ``prompt_len`` are the
    prompt (prefilled ``prefill_chunk`` columns at a time) and the rest are generated."""

    train_batch: int
    seq_len: int
    rollout_batch: int
    context: int
    prompt_len: int
    prefill_chunk: int


def lower_train(cfg: ModelConfig, optim: OptimConfig, mesh, s: Shapes):
    """The CISPO update, jitted over (model, optimizer) state with donated state; returns Lowered."""
    from m1jax.rl.cispo import LossConfig
    from m1jax.rl.steps import cispo_step

    def make():
        model = MiniMaxM1(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, make_optimizer(optim), wrt=nnx.Param)

    graphdef, state = abstract_state(make, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    loss_cfg = LossConfig()

    def step(state, ids, comp_mask, old_logp, advantages, weights):
        model, opt = nnx.merge(graphdef, state)
        metrics = cispo_step(model, opt, ids, comp_mask, old_logp, advantages, weights, loss_cfg)
        return nnx.state((model, opt)), metrics

    b, t = s.train_batch, s.seq_len
    args = (state, batch_array(mesh, (b, t), jnp.int32), batch_array(mesh, (b, t - 1), jnp.bool_),
            batch_array(mesh, (b, t - 1), jnp.float32), batch_array(mesh, (b,), jnp.float32),
            batch_array(mesh, (b, t - 1), jnp.float32))
    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None)).lower(*args), args


def _model_state(cfg: ModelConfig, mesh):
    return abstract_state(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)), mesh)


def lower_prefill(cfg: ModelConfig, mesh, s: Shapes):
    """``rollout.engine.prefill`` of ``prompt_len`` tokens into a fresh cache of ``context`` columns."""
    from m1jax.rollout.engine import prefill

    graphdef, state = _model_state(cfg, mesh)
    b = s.rollout_batch
    args = (state, batch_array(mesh, (b, s.prompt_len), jnp.int32), batch_array(mesh, (b, s.prompt_len), jnp.int32))
    with jax.set_mesh(mesh):
        lowered = prefill.lower(graphdef, *args, max_new=s.context - s.prompt_len, chunk=s.prefill_chunk)
    return lowered, args


def lower_decode(cfg: ModelConfig, mesh, s: Shapes, sampling):
    """``rollout.engine.decode``: the while_loop generating ``context - prompt_len`` tokens per
    sequence from a prefilled cache of ``context`` columns (donated)."""
    from m1jax.rollout.engine import decode

    graphdef, state = _model_state(cfg, mesh)
    b = s.rollout_batch
    sampling = dataclasses.replace(sampling, max_new_tokens=s.context - s.prompt_len)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, abstract_cache(cfg, mesh, b, s.context), batch_array(mesh, (b, cfg.vocab_size), jnp.float32),
            batch_array(mesh, (b,), jnp.int32))
    with jax.set_mesh(mesh):
        lowered = decode.lower(graphdef, *args, s.prompt_len, key, sampling, 1)
    return lowered, args


# ----------------------------------------------------------------------------- compile and measure
@dataclasses.dataclass
class Compiled:
    program: str
    seconds: float
    memory: dict[str, int]  # memory_analysis() fields, bytes per device
    peak: int  # bytes per device
    flops: float  # per device
    bytes_accessed: float  # per device
    lightning_kernels: dict[str, int]  # Pallas lightning kernels (lightning_fwd, ...) in the optimized HLO
    hlo: str

    @property
    def collectives(self) -> dict[str, tuple[int, int]]:
        return collective_bytes(self.hlo)


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_temp_size_in_bytes")


def compile_lowered(program: str, lowered) -> Compiled:
    """Compile for the TPU target; raises jax.errors.JaxRuntimeError (RESOURCE_EXHAUSTED) on OOM."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return Compiled(program, seconds, {f: int(getattr(ma, f)) for f in MEMORY_FIELDS}, int(ma.peak_memory_in_bytes),
                    float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan"))),
                    lightning_kernels(hlo), hlo)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """{collective: (ops, result bytes per chip)} over the instructions of the optimized HLO text,
    async starts counted once. A loop body's collectives are counted once, not per trip."""
    out: dict[str, tuple[int, int]] = {}
    pattern = re.compile(r"= (\(?[^=]*?\)?) (" + "|".join(_COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m or "-done(" in line:
            continue
        nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(x) for x in dims.split(",") if x)
                     for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
        n, b = out.get(m.group(2), (0, 0))
        out[m.group(2)] = (n + 1, b + nbytes)
    return out


def lightning_kernels(hlo: str) -> dict[str, int]:
    """Count of each Pallas lightning kernel (Mosaic custom calls named lightning_*) in TPU HLO text."""
    counts: dict[str, int] = {}
    for name in re.findall(r"%(lightning_\w+?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo):
        counts[name] = counts.get(name, 0) + 1
    return counts


def mesh_for(devices, mc: MeshConfig):
    if mc.size != len(devices):
        raise PlanError(f"mesh {dict(zip(AXES, mc.shape))} has {mc.size} devices but the topology has "
                        f"{len(devices)}; choose --mesh.* sizes whose product is {len(devices)}.")
    return make_mesh(mc, devices)


def validate_shapes(s: Shapes, dp: int) -> None:
    """Sizes the programs can take on a mesh with ``dp`` = data x fsdp x expert batch shards."""
    for key, n in (("batch", s.train_batch), ("rollout_batch", s.rollout_batch)):
        if n % dp:
            raise PlanError(f"--{key}={n} is not divisible by data x fsdp x expert = {dp} (sequences are split "
                            f"over those axes); use a multiple of {dp}.")
    if s.seq_len < 2:
        raise PlanError(f"--seq_len={s.seq_len}: a train sequence needs at least 2 tokens.")
    if not 0 < s.prompt_len < s.context:
        raise PlanError(f"--prompt_len={s.prompt_len} must be > 0 and < --context={s.context} (room to generate).")
    if s.prompt_len % s.prefill_chunk:
        raise PlanError(f"--prefill_chunk={s.prefill_chunk} must divide --prompt_len={s.prompt_len}.")


def sharding_notes(cfg: ModelConfig, mesh) -> list[str]:
    """How sizes that a mesh axis may not divide are handled, stated explicitly.

    The rule (``m1jax.sharding.spec_for``): a dimension is sharded over its mesh axis only when the
    axis size divides it, otherwise it is kept whole on every chip (replicated over that axis);
    nothing is padded. The vocabulary (200064 = 2^7 * 3 * 521) splits over tensor <= 128."""
    tp = mesh.shape["tensor"]
    notes = []
    if tp > 1:
        if cfg.vocab_size % tp == 0:
            notes.append(f"vocab {cfg.vocab_size} is sharded over tensor={tp}: {cfg.vocab_size // tp} rows of the "
                         "embedding and LM-head columns per chip")
        else:
            notes.append(f"vocab {cfg.vocab_size} is not divisible by tensor={tp}: the embedding and the LM head keep "
                         f"the whole vocabulary on every chip (pad vocab_size to a multiple of {tp} to shard it)")
        for key, n, what in (("num_heads", cfg.num_heads, "lightning heads and states"),
                             ("num_kv_heads", cfg.num_kv_heads, "KV-cache heads")):
            if n % tp:
                notes.append(f"{key}={n} is not divisible by tensor={tp}: {what} are replicated over tensor")
    return notes + replicated_dims(cfg, mesh)


def replicated_dims(cfg: ModelConfig, mesh) -> list[str]:
    """Parameter dimensions whose rule names a mesh axis of size > 1 that does not divide them (kept
    whole over that axis by ``spec_for``), e.g. 'embed.vocab=510 ... tensor=4'."""
    from m1jax.sharding import RULES

    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    notes = set()
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes, shape = var.get_metadata()["axes"], var.get_value().shape
        lead = len(shape) - len(axes)  # the scanned layer-stack axis
        for name, dim, entry in zip(axes, shape[lead:], tuple(spec_for(axes, shape, mesh))[lead:]):
            rule = RULES.get(name)
            if isinstance(rule, str) and mesh.shape[rule] > 1 and entry is None:
                where = ".".join(str(p) for p in path if not str(p).isdigit())
                notes.add(f"parameter {where}: {name}={dim} is not divisible by {rule}={mesh.shape[rule]}; "
                          "replicated over it")
    return sorted(notes)
