"""Load and save MiniMax checkpoints (config.json + *.safetensors).

Two on-disk formats are read (spec §2.1, §8):

* transformers (``model_type: "minimax"``): ``layer_types``, ``*_alpha_factor`` / ``*_beta_factor``,
  ``rope_parameters``; experts either packed (``mlp.experts.gate_up_proj [E, 2I, D]``,
  ``mlp.experts.down_proj [E, D, I]``, router ``mlp.gate.weight``) or per expert
  (``block_sparse_moe.experts.N.w1/w2/w3.weight``, router ``block_sparse_moe.gate.weight``).
  transformers rotates the full head (rotary_dim = head_dim) and uses its own decay factor, so
  a checkpoint in this format loads with ``rotary_dim=head_dim, decay_convention="hf"``.
* original MiniMax remote code (``minimax_m1`` / ``minimax_text_01``): ``attn_type_list``
  (0 = lightning, 1 = softmax), ``layernorm_*_alpha/beta``, ``postnorm``, ``rotary_dim``.

``save`` writes the transformers format (per-expert layout, which transformers 5.x loads and
re-packs itself). Tensors are read one at a time from memory-mapped files, so a checkpoint is never
held twice in memory. Weights are PyTorch ``[out, in]``; m1jax stores ``[in, out]``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from m1jax import sharding as shd
from m1jax.model.config import FULL, LINEAR, ModelConfig
from m1jax.model.decoder import MiniMaxM1

# transformers registers these decay buffers; they are functions of the config, not weights.
_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


class CheckpointError(ValueError):
    """The checkpoint does not match the model: names the tensor, expected and found."""


# ----------------------------------------------------------------------------- config
def config_from_hf(d: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a config.json dict in either format; ``overrides`` win (e.g. dtype)."""
    original = "attn_type_list" in d
    heads = d.get("num_attention_heads", 32)
    hidden = d.get("hidden_size", 4096)
    head_dim = d.get("head_dim") or hidden // heads
    n_layers = d.get("num_hidden_layers", 32)
    if original:
        layer_types = [FULL if int(t) == 1 else LINEAR for t in d["attn_type_list"]]
        alpha = lambda k: d.get(f"layernorm_{k}_alpha", 1.0)  # noqa: E731
        beta = lambda k: d.get(f"layernorm_{k}_beta", 1.0)  # noqa: E731
        names = {"linear": "linear_attention", "full": "full_attention", "mlp": "mlp"}
        rope_theta = d.get("rope_theta", 10_000.0)
        rotary_dim = d.get("rotary_dim") or head_dim
        postnorm = bool(d.get("postnorm", False))
        convention = "original"
        if d.get("shared_intermediate_size", 0):
            raise CheckpointError(
                "config.json: shared_intermediate_size > 0 (a shared expert) is not supported by m1jax; "
                "no released MiniMax-M1/Text-01 checkpoint uses it."
            )
    else:
        layer_types = d.get("layer_types") or [FULL if (i + 1) % 2 else LINEAR for i in range(n_layers)]
        alpha = lambda k: d.get(f"{k}_alpha_factor", 1.0)  # noqa: E731
        beta = lambda k: d.get(f"{k}_beta_factor", 1.0)  # noqa: E731
        names = {"linear": "linear_attn", "full": "full_attn", "mlp": "mlp"}
        rope = d.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        rotary_dim = head_dim  # transformers 5.x ignores rotary_dim and rotates the whole head
        postnorm = True
        convention = "hf"
    kw = dict(
        vocab_size=d.get("vocab_size", 32000),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        num_experts=d.get("num_local_experts", 8),
        num_experts_per_tok=d.get("num_experts_per_tok", 2),
        intermediate_size=d.get("intermediate_size", 14336),
        linear_attn_alpha=float(alpha(names["linear"])),
        linear_attn_beta=float(beta(names["linear"])),
        full_attn_alpha=float(alpha(names["full"])),
        full_attn_beta=float(beta(names["full"])),
        mlp_alpha=float(alpha(names["mlp"])),
        mlp_beta=float(beta(names["mlp"])),
        postnorm=postnorm,
        rope_theta=float(rope_theta),
        rotary_dim=int(rotary_dim),
        block_size=d.get("block_size", 256),
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001),
        decay_convention=convention,
        max_position_embeddings=d.get("max_position_embeddings", 131072),
        initializer_range=d.get("initializer_range", 0.02),
    )
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act={d['hidden_act']!r} is not supported (MiniMax uses silu).")
    if d.get("tie_word_embeddings", False):
        raise CheckpointError("config.json: tie_word_embeddings=true is not supported (MiniMax unties lm_head).")
    kw.update(overrides)
    return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers MiniMaxConfig dict for cfg. transformers cannot express partial RoPE or postnorm=False."""
    if cfg.rotary_dim != cfg.head_dim:
        raise CheckpointError(
            f"cannot save rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim} in transformers format: "
            "transformers 5.x rotates the whole head and would silently change the model. "
            "Use rotary_dim=head_dim, or keep the checkpoint in m1jax's own (orbax) format."
        )
    if not cfg.postnorm:
        raise CheckpointError("cannot save postnorm=False in transformers format (transformers is always postnorm).")
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_local_experts": cfg.num_experts,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "layer_types": list(cfg.layer_types),
        "block_size": cfg.block_size,
        "full_attn_alpha_factor": cfg.full_attn_alpha,
        "full_attn_beta_factor": cfg.full_attn_beta,
        "linear_attn_alpha_factor": cfg.linear_attn_alpha,
        "linear_attn_beta_factor": cfg.linear_attn_beta,
        "mlp_alpha_factor": cfg.mlp_alpha,
        "mlp_beta_factor": cfg.mlp_beta,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": cfg.param_dtype,
    }


# ----------------------------------------------------------------------------- name mapping
# (path inside one DecoderLayer) -> (checkpoint name after "model.layers.N.", transposed?)
_LAYER_PARAMS = {
    ("input_norm", "weight"): ("input_layernorm.weight", False),
    ("post_norm", "weight"): ("post_attention_layernorm.weight", False),
    ("mixer", "qkv"): ("self_attn.qkv_proj.weight", True),
    ("mixer", "gate"): ("self_attn.output_gate.weight", True),
    ("mixer", "out"): ("self_attn.out_proj.weight", True),
    ("mixer", "norm"): ("self_attn.norm.weight", False),
    ("mixer", "q"): ("self_attn.q_proj.weight", True),
    ("mixer", "k"): ("self_attn.k_proj.weight", True),
    ("mixer", "v"): ("self_attn.v_proj.weight", True),
    ("mixer", "o"): ("self_attn.o_proj.weight", True),
    ("moe", "router"): ("block_sparse_moe.gate.weight", True),
}
_EXPERT_PARAMS = {("moe", "w1"): "w1", ("moe", "w3"): "w3", ("moe", "w2"): "w2"}
_GLOBAL_PARAMS = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("final_norm", "weight"): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
}


def _global_layer(cfg: ModelConfig, group: str, rep: int, slot: int) -> int:
    period, repeats, _ = cfg.pattern
    return rep * len(period) + slot if group == "blocks" else repeats * len(period) + slot


class _Reader:
    """Lazy tensor access over one or many safetensors files, with both expert layouts."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json).")
            weight_map = {}
            for fn in files:
                with safe_open(os.path.join(path, fn), "numpy") as f:
                    weight_map.update({k: fn for k in f.keys()})
        self.path, self.weight_map = path, weight_map
        self._files: dict[str, Any] = {}
        self.used: set[str] = set()
        self._packed_cache: dict[str, np.ndarray] = {}

    def _file(self, key):
        fn = self.weight_map[key]
        if fn not in self._files:
            self._files[fn] = safe_open(os.path.join(self.path, fn), "numpy")
        return self._files[fn]

    def has(self, key):
        return key in self.weight_map

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path}: missing tensor {key!r} (expected shape {list(shape)}).")
        found = tuple(self._file(key).get_slice(key).get_shape())
        if found != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has shape {list(found)}, expected {list(shape)} for this config."
            )
        self.used.add(key)
        return self._file(key).get_tensor(key)

    def router(self, l: int, e: int, d: int) -> np.ndarray:
        packed = f"model.layers.{l}.mlp.gate.weight"
        if self.has(packed):
            return self.get(packed, (e, d))
        return self.get(f"model.layers.{l}.block_sparse_moe.gate.weight", (e, d))

    def experts(self, l: int, which: str, e: int, d: int, i: int) -> np.ndarray:
        """Expert weights of layer l as [E, out, in] (PyTorch layout) for which in w1, w3, w2."""
        gate_up = f"model.layers.{l}.mlp.experts.gate_up_proj"
        down = f"model.layers.{l}.mlp.experts.down_proj"
        if self.has(gate_up) or self.has(down):
            if which == "w2":
                return self.get(down, (e, d, i))
            if gate_up not in self._packed_cache:  # read once for both w1 and w3
                self._packed_cache = {gate_up: self.get(gate_up, (e, 2 * i, d))}
            packed = self._packed_cache[gate_up]
            return packed[:, :i] if which == "w1" else packed[:, i:]
        shape = (d, i) if which == "w2" else (i, d)
        return np.stack(
            [self.get(f"model.layers.{l}.block_sparse_moe.experts.{x}.{which}.weight", shape) for x in range(e)]
        )

    def unused(self) -> list[str]:
        return sorted(k for k in self.weight_map if k not in self.used and k.rsplit(".", 1)[-1] not in _DECAY_BUFFERS)


def _torch_shape(shape, transposed: bool):
    return tuple(reversed(shape)) if transposed else tuple(shape)


def _fetch(reader: _Reader, cfg: ModelConfig, path: tuple, shape: tuple[int, ...]) -> np.ndarray:
    """Read the checkpoint tensor(s) for one m1jax parameter (stacked layers included)."""
    if path in _GLOBAL_PARAMS:
        name, transposed = _GLOBAL_PARAMS[path]
        x = reader.get(name, _torch_shape(shape, transposed))
        return x.T if transposed else x
    group, slot, sub = path[0], path[2], path[3:]
    out = None
    for rep in range(shape[0]):
        l = _global_layer(cfg, group, rep, slot)
        inner = shape[1:]
        if sub in _EXPERT_PARAMS:
            e, a, b = inner
            x = reader.experts(l, _EXPERT_PARAMS[sub], e, *((b, a) if sub[1] == "w2" else (a, b)))
            x = x.transpose(0, 2, 1)
        elif sub == ("moe", "router"):
            x = reader.router(l, inner[1], inner[0]).T
        else:
            name, transposed = _LAYER_PARAMS[sub]
            x = reader.get(f"model.layers.{l}.{name}", _torch_shape(inner, transposed))
            x = x.T if transposed else x
        if out is None:
            out = np.empty(shape, x.dtype)
        out[rep] = x
    return out


def read_config(path: str, **overrides) -> ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{path}: no config.json; point to a MiniMax checkpoint directory.")
    with open(cfg_file) as f:
        return config_from_hf(json.load(f), **overrides)


def load(path: str, dtype: str | None = None, param_dtype: str | None = None, *, mesh=None,
         **overrides) -> MiniMaxM1:
    """Load a checkpoint directory (either format) into a MiniMaxM1 model.

    dtype: compute dtype (default float32); param_dtype: storage dtype of the parameters (default
    float32). Other ModelConfig fields may be overridden (e.g. ``lightning_impl``, ``block_size``).
    mesh: place each parameter in its sharding (``m1jax.sharding`` rules) as it is read, instead
    of on the default device. Raises CheckpointError naming any missing, unexpected or misshaped
    tensor.
    """
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    cfg = read_config(path, **overrides)
    if mesh is not None:
        shd.validate_model_for_mesh(cfg, mesh)
    reader = _Reader(path)
    abstract = nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for key, var in flat:
        sds = var.get_value()
        x = _fetch(reader, cfg, _norm_path(key), sds.shape)
        x = np.asarray(x, dtype=sds.dtype)
        var.set_value(jnp.asarray(x) if mesh is None else jax.device_put(x, shd.param_sharding(var, mesh)))
        del x
    unused = reader.unused()
    if unused:
        more = f" (and {len(unused) - 10} more)" if len(unused) > 10 else ""
        raise CheckpointError(
            f"{path}: {len(unused)} unexpected tensor(s) not used by this config: {unused[:10]}{more}. "
            "Check num_hidden_layers / layer_types / num_local_experts in config.json."
        )
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _norm_path(key: tuple) -> tuple:
    """('blocks','layers',3,'mixer','qkv') -> ('blocks', 'layers', 3, 'mixer', 'qkv') with ints kept."""
    return tuple(int(k) if isinstance(k, (int, np.integer)) else k for k in key)


def save(model: MiniMaxM1, path: str, *, max_shard_bytes: int = 2 << 30) -> None:
    """Write model to ``path`` in the transformers format (config.json + sharded safetensors)."""
    cfg = model.cfg
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = _norm_path(key)
        x = np.asarray(jax.device_get(var.get_value()))
        if key in _GLOBAL_PARAMS:
            name, transposed = _GLOBAL_PARAMS[key]
            tensors[name] = x.T if transposed else x
            continue
        group, slot, sub = key[0], key[2], key[3:]
        for rep in range(x.shape[0]):
            l = _global_layer(cfg, group, rep, slot)
            if sub in _EXPERT_PARAMS:
                for e in range(x.shape[1]):
                    tensors[f"model.layers.{l}.block_sparse_moe.experts.{e}.{_EXPERT_PARAMS[sub]}.weight"] = x[rep, e].T
            else:
                name, transposed = _LAYER_PARAMS[sub]
                tensors[f"model.layers.{l}.{name}"] = x[rep].T if transposed else x[rep]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(tensors[name])
        size += nbytes
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards):
        fn = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in shard})
    if n > 1:
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
