"""One device mesh for sampling and training: mesh construction, logical-axis rules, sharded init.

Mesh axes (all five always exist; size 1 means unused):
  data      pure data parallelism (replicated parameters)
  fsdp      data parallelism with parameters sharded along their "embed" axis (gathered per use)
  expert    expert parallelism: each device holds num_experts / expert experts; outside the MoE
            this axis carries data (tokens are sharded over data x fsdp x expert)
  sequence  sequence (context) parallelism: activations' length dimension is split over it,
            parameters are not; the mixers combine the shards (lightning: decayed prefix of the
            shards' states; softmax: keys and values gathered) and the MoE takes the shards'
            tokens as more rows
  tensor    tensor parallelism of attention heads, expert MLP width and the vocabulary

Every parameter carries logical axis names (``axes`` metadata, set where it is created);
``RULES`` maps each name to mesh axes. A dimension that a mesh axis does not divide is left
replicated (and reported by ``m1jax.plan.memory``), e.g. 8 kv heads on tensor=16.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "sequence", "tensor")
BATCH = ("data", "fsdp", "expert")  # mesh axes that shard the batch

# Logical axis -> mesh axis (or None: replicated). The single table for parameters and activations.
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "qkv": "tensor",  # fused head-major [head][q|k|v][d]: contiguous per head
    "heads_x_dim": "tensor",
    "kv_heads_x_dim": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "experts_unsharded": None,
    "layers": None,  # the scanned layer-stack axis
    # activations
    "batch": BATCH,
    "seq": "sequence",
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}


class MeshError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in AXES)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "MeshConfig":
        unknown = sorted(set(d) - set(AXES))
        if unknown:
            raise MeshError(f"mesh: unknown axis {unknown}; the axes are {AXES}.")
        for k, v in d.items():
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise MeshError(f"mesh.{k}: must be a positive integer, got {v!r}.")
        return cls(**{k: int(v) for k, v in d.items()})

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """'data=2,expert=4' -> MeshConfig(data=2, expert=4)."""
        items = [kv.split("=") for kv in text.split(",") if kv]
        if any(len(kv) != 2 for kv in items):
            raise MeshError(f"mesh {text!r}: write it as axis=size pairs, e.g. 'fsdp=2,expert=4'.")
        return cls.from_dict({k.strip(): int(v) for k, v in items})


def make_mesh(mc: MeshConfig, devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with Auto axis types."""
    devices = jax.devices() if devices is None else list(devices)
    if mc.size != len(devices):
        raise MeshError(
            f"mesh {dict(zip(AXES, mc.shape))} needs {mc.size} devices but {len(devices)} are available; "
            f"choose sizes whose product is {len(devices)}."
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(mc.shape, devices=devices)
    except Exception:  # noqa: BLE001 -- non-physical device sets (CPU, compile-only topologies)
        arr = np.asarray(devices).reshape(mc.shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_from_config(section: Mapping[str, int] | None, devices=None) -> Mesh:
    """The mesh of a config's ``mesh`` section (train.py, rollout.py): axis sizes, one of which may be
    -1 for the devices the others leave. A mesh smaller than the device count takes the first
    devices (the scripts print how many they use); a missing section is one device."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = dict(section or {})
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise MeshError(f"mesh {sizes}: only one axis may be -1 (the devices the others leave), not {free}.")
    if free:
        rest = math.prod(v for a, v in sizes.items() if a != free[0] and isinstance(v, int) and v > 0)
        if len(devices) % rest:
            raise MeshError(f"mesh {sizes}: the other axes take {rest} devices, which does not divide the "
                            f"{len(devices)} available.")
        sizes[free[0]] = len(devices) // rest
    mc = MeshConfig.from_dict(sizes)
    if mc.size > len(devices):
        raise MeshError(f"mesh {dict(zip(AXES, mc.shape))} needs {mc.size} devices but {len(devices)} are "
                        f"available; choose sizes whose product is at most {len(devices)} (or set one axis to -1).")
    return make_mesh(mc, devices[:mc.size])


def describe_mesh(mesh: Mesh) -> str:
    """'mesh data=2 expert=4: 8 of 8 devices' (axes of size 1 left out)."""
    axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "(none: one device)"
    return f"mesh {axes}: {mesh.size} of {jax.device_count()} devices"


def describe_params(model) -> str:
    """'parameters: 5.1 MiB, 1.6 MiB on device 0' -- what sharding leaves a device (this process's
    first) to hold."""
    arrays = [x for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.Array)]
    total = sum(x.nbytes for x in arrays)
    dev = jax.local_devices()[0]
    local = sum(s.data.nbytes for x in arrays for s in x.addressable_shards if s.device == dev)
    return f"parameters: {total / 2**20:.1f} MiB, {local / 2**20:.1f} MiB on device {dev.id}"


def param_sharding(var: nnx.Variable, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> NamedSharding:
    """A variable's NamedSharding under the rules (replicated when it has no logical axes)."""
    axes = var.get_metadata().get("axes")
    return NamedSharding(mesh, P() if axes is None else spec_for(axes, var.get_value().shape, mesh, rules))


def validate_model_for_mesh(cfg, mesh: MeshConfig | Mesh) -> None:
    """Fail at startup, before compiling, for a model that cannot run on this mesh (a MeshConfig or
    a built Mesh)."""
    expert = mesh.shape["expert"] if isinstance(mesh, Mesh) else mesh.expert
    if cfg.num_experts % expert:
        raise MeshError(
            f"mesh.expert={expert} does not divide model.num_experts={cfg.num_experts}; "
            "use an expert axis size that divides the number of experts."
        )


def spec_for(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: Mapping[str, Any] = RULES) -> P:
    """PartitionSpec for an array with logical ``axes`` (a leading unnamed stack axis is allowed)."""
    axes = tuple(axes)
    if len(shape) == len(axes) + 1:
        axes = ("layers",) + axes
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} do not match")
    out, used = [], set()
    for dim, name in zip(shape, axes):
        mesh_axes = rules.get(name)
        if mesh_axes is None:
            out.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        group = tuple(a for a in group if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in group)
        if not group or dim % size:
            out.append(None)
            continue
        used.update(group)
        out.append(group[0] if len(group) == 1 else group)
    return P(*out)


def state_shardings(state, mesh: Mesh, rules: Mapping[str, Any] = RULES):
    """NamedSharding for every variable of an nnx State (abstract or concrete)."""

    return jax.tree.map(lambda var: param_sharding(var, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model, mesh: Mesh, rules: Mapping[str, Any] = RULES):
    """Build ``make_model()`` with every parameter created directly in its sharding (under jit
    with out_shardings): nothing is materialized whole on one device first."""
    graphdef, abs_state = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abs_state, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def build_on_mesh(make_model, mesh: Mesh):
    """For a script or notebook that runs on ``mesh``: with several devices, make it the current
    mesh (``jax.set_mesh``: what follows runs sharded, the MoE expert-parallel) and create
    ``make_model()`` straight into its shardings; with one, build the model eagerly, as is (jit-built
    parameters differ from eager ones by float rounding, and single-device results stay as they were)."""
    if mesh.size == 1:
        return make_model()
    jax.set_mesh(mesh)
    return create_sharded(make_model, mesh)


def current_mesh():
    """The mesh set with ``jax.set_mesh`` (abstract inside jit), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def constrain_state(module) -> None:
    """Pin every variable with logical axes to its rule sharding (inside jit; no-op without a mesh).

    Used after an optimizer update so that parameters and optimizer state keep the shardings they
    were created with instead of whatever the partitioner would choose for the update's output."""
    mesh = current_mesh()
    if mesh is None:
        return
    for _, var in nnx.to_flat_state(nnx.state(module)):
        axes = var.get_metadata().get("axes")
        value = var.get_value()
        if axes is not None and hasattr(value, "shape") and len(value.shape) >= len(axes):
            var.set_value(jax.lax.with_sharding_constraint(value, spec_for(axes, value.shape, mesh)))


def constrain(x, *logical):
    """with_sharding_constraint by logical axis names; a no-op without a mesh."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """[batch, seq, ...] arrays: batch over data x fsdp x expert."""
    return NamedSharding(mesh, P(batch_spec(mesh), *([None] * (ndim - 1))))


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH if a in mesh.shape and mesh.shape[a] > 1)


def batch_spec(mesh):
    """The PartitionSpec entry of a batch dimension on ``mesh``: its batch axes of size > 1, one
    name, a tuple of several, or None."""
    bax = batch_axes(mesh)
    return (bax if len(bax) > 1 else bax[0]) if bax else None


def sequence_shards(mesh) -> int:
    """How many ways activations' length dimension is split on ``mesh`` (1 without a mesh)."""
    return 1 if mesh is None or "sequence" not in mesh.shape else mesh.shape["sequence"]


def batch_shards(mesh) -> int:
    """How many ways the batch is split on ``mesh`` (data x fsdp x expert; 1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh))
