"""ModelConfig: every architectural field of MiniMax-M1 (values and names as in the released config.json)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

LINEAR = "linear_attention"  # lightning attention
FULL = "full_attention"  # softmax GQA attention
LAYER_TYPES = (LINEAR, FULL)
DTYPES = ("float32", "bfloat16", "float16")


def hybrid_layer_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """MiniMax-M1's pattern: layer l is softmax iff (l + 1) % period == 0, else lightning."""
    return tuple(FULL if (l + 1) % period == 0 else LINEAR for l in range(num_layers))


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the hybrid lightning/softmax-attention MoE decoder.

    Field names follow the HF ``MiniMaxConfig`` where one exists. Defaults are MiniMax-M1's.
    """

    vocab_size: int = 200064
    hidden_size: int = 6144
    num_layers: int = 80
    num_heads: int = 64  # query heads of both layer types
    num_kv_heads: int = 8  # key/value heads of the softmax layers
    head_dim: int = 128
    layer_types: tuple[str, ...] = hybrid_layer_types(80)
    num_experts: int = 32
    num_experts_per_tok: int = 2
    intermediate_size: int = 9216  # per expert
    # x_next = alpha * residual + beta * sublayer (spec §4).
    linear_attn_alpha: float = 3.5565588200778455
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 3.5565588200778455
    full_attn_beta: float = 1.0
    mlp_alpha: float = 3.5565588200778455
    mlp_beta: float = 1.0
    postnorm: bool = True  # residual is the normed input (released checkpoints, HF)
    rope_theta: float = 10_000_000.0
    rotary_dim: int = 64  # channels of each head that RoPE rotates (HF 5.23 rotates all: head_dim)
    block_size: int = 256  # lightning chunk length
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.001
    # Expert parallelism: None = dropless (default); c > 0 caps each device-to-device buffer at
    # ceil(tokens * top_k / expert_shards * c) rows, dropping the overflow.
    moe_capacity_factor: float | None = None
    # Expert parallelism takes each device's tokens this many at a time (dispatch, experts and
    # return per chunk, rematerialized), so its [expert_shards * capacity, hidden] buffers are per
    # chunk; 0 = all at once. The same values (dropless); with a capacity factor, capacity is per chunk.
    moe_chunk: int = 0
    # Single-device experts: "grouped" (sorted rows, ragged_dot: each row computes only its
    # expert — native on GPU/TPU), "dense" (every expert on every token, combined with the routing
    # weights), or "auto" = grouped on GPU/TPU and, when compiled for CPU (chosen by
    # jax.lax.platform_dependent), fixed row slots per expert (1.5x the balanced load; dense when
    # an expert's tokens overflow them or the batch is small): XLA:CPU lowers ragged_dot to a masked
    # product of each of the tokens*top_k rows with every expert (top_k times dense's work).
    # Under a mesh: grouped.
    moe_impl: str = "auto"
    # "original": slope layer factor 1 - l/(L-1) + 1e-5 and ALiBi slope interpolation for
    # non-power-of-two heads (MiniMax remote code, vLLM); "hf": transformers' variant.
    decay_convention: str = "original"
    max_position_embeddings: int = 10_240_000
    initializer_range: float = 0.02
    # Precision policy: params in param_dtype, activations in dtype; the lightning mixer
    # (state and norm statistics), router softmax and the LM head (when lm_head_fp32) in float32.
    dtype: str = "float32"
    param_dtype: str = "float32"
    lm_head_fp32: bool = True
    lightning_impl: str = "auto"  # kernels_pallas.lightning_attention impl
    # With lightning_impl="pallas": lower this Pallas variant ("tpu" or "gpu") whatever the host's
    # backend is; None = the host's. Set to "tpu" by m1jax.plan to compile TPU programs on a CPU host.
    pallas_backend: str | None = None
    # Softmax attention without a cache takes its queries this many at a time (scores [chunk, seq]
    # instead of [seq, seq]; the same values); 0 = all at once.
    attention_chunk: int = 512
    scan_layers: bool = True  # scan over repeats of the layer pattern
    remat: bool = False  # rematerialize each repeat of the layer pattern in the backward pass
    # Also rematerialize each layer (nested in remat: a block's backward then holds one layer's
    # activations at a time instead of the whole block's, for one more forward pass).
    remat_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"model.{key}: {msg}")

        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "num_experts", "num_experts_per_tok", "intermediate_size", "block_size", "rotary_dim"):
            v = getattr(self, key)
            need(isinstance(v, (int, np.integer)) and v >= 1, key, f"must be a positive integer, got {v!r}.")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}; "
             "choose num_kv_heads dividing num_heads (GQA groups must be equal).")
        need(len(self.layer_types) == self.num_layers, "layer_types",
             f"has {len(self.layer_types)} entries but num_layers={self.num_layers}; give one type per layer "
             "(e.g. hybrid_layer_types(num_layers)).")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not bad, "layer_types", f"unknown layer type(s) {bad}; use {LAYER_TYPES}.")
        need(self.rotary_dim % 2 == 0, "rotary_dim",
             f"must be even (rotate-half pairs channel i with i + rotary_dim/2), got {self.rotary_dim}.")
        need(self.rotary_dim <= self.head_dim, "rotary_dim",
             f"={self.rotary_dim} exceeds head_dim={self.head_dim}; use at most head_dim.")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
             f"={self.num_experts_per_tok} exceeds num_experts={self.num_experts}.")
        need(self.decay_convention in ("original", "hf"), "decay_convention",
             f"must be 'original' or 'hf', got {self.decay_convention!r}.")
        for key in ("dtype", "param_dtype"):
            need(getattr(self, key) in DTYPES, key, f"must be one of {DTYPES}, got {getattr(self, key)!r}.")
        for key in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
            need(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)!r}.")
        for key in ("linear_attn_alpha", "linear_attn_beta", "full_attn_alpha", "full_attn_beta",
                    "mlp_alpha", "mlp_beta", "router_aux_loss_coef"):
            need(math.isfinite(getattr(self, key)), key, f"must be finite, got {getattr(self, key)!r}.")
        need(self.moe_capacity_factor is None or self.moe_capacity_factor > 0, "moe_capacity_factor",
             f"must be None (dropless) or > 0, got {self.moe_capacity_factor!r}.")
        need(self.moe_impl in ("auto", "grouped", "dense"), "moe_impl",
             f"must be 'auto', 'grouped' or 'dense', got {self.moe_impl!r}.")
        need(self.lightning_impl in ("auto", "xla", "pallas"), "lightning_impl",
             f"must be 'auto', 'xla' or 'pallas', got {self.lightning_impl!r}.")
        need(isinstance(self.moe_chunk, (int, np.integer)) and self.moe_chunk >= 0, "moe_chunk",
             f"must be an integer >= 0 (0 = no chunking), got {self.moe_chunk!r}.")
        need(isinstance(self.attention_chunk, (int, np.integer)) and self.attention_chunk >= 0, "attention_chunk",
             f"must be an integer >= 0 (0 = no chunking), got {self.attention_chunk!r}.")
        need(self.pallas_backend in (None, "tpu", "gpu"), "pallas_backend",
             f"must be None (the host's backend), 'tpu' or 'gpu', got {self.pallas_backend!r}.")

    # ------------------------------------------------------------------ derived
    @property
    def pattern(self) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
        """(period types, repeats, tail types): the shortest period p with layer_types[i] ==
        layer_types[i % p] for all i; repeats = num_layers // p; the tail holds the rest."""
        types = self.layer_types
        n = len(types)
        for p in range(1, n + 1):
            if all(types[i] == types[i % p] for i in range(n)):
                reps = n // p
                return types[:p], reps, types[reps * p:]
        raise AssertionError("unreachable")

    def decay_rates(self) -> np.ndarray:
        """sigma[l, h] for every layer (softmax layers too; unused there), float64 [L, H]."""
        h = self.num_heads
        if self.decay_convention == "hf" or (h & (h - 1)) == 0:
            slopes = np.array([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])
        else:
            slopes = np.array(_alibi_slopes(h))
        L = self.num_layers
        out = np.zeros((L, h))
        for l in range(L):
            if self.decay_convention == "hf":
                f = 1.0 - l / (L - 1 + 1e-5) + 1e-5
            else:
                f = 1.0 + 1e-5 if L <= 1 else 1.0 - l / (L - 1) + 1e-5
            out[l] = slopes * f
        return out

    def param_count(self) -> int:
        """Exact parameter count from the config (no allocation)."""
        d, hd = self.hidden_size, self.num_heads * self.head_dim
        kvd = self.num_kv_heads * self.head_dim
        lin = 3 * hd * d + hd * d + d * hd + hd
        full = hd * d + 2 * kvd * d + d * hd
        moe = self.num_experts * d + self.num_experts * 3 * d * self.intermediate_size
        per_layer = 2 * d + moe
        n_lin = sum(t == LINEAR for t in self.layer_types)
        n_full = self.num_layers - n_lin
        return 2 * self.vocab_size * d + d + self.num_layers * per_layer + n_lin * lin + n_full * full

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a plain mapping (e.g. an ml_collections ConfigDict), rejecting unknown keys."""
        return dataclass_from_dict(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


def dataclass_from_dict(cls, d: Mapping[str, Any], section: str):
    """cls(**d) for a config section, naming unknown keys and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; valid keys are {sorted(names)}.")
    return cls(**dict(d))


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes with interpolation for non-power-of-two n (original MiniMax code, vLLM)."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]
