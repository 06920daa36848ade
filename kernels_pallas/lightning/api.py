"""Public lightning-attention ops and implementation dispatch.

impl:
  "xla"     the pure-jnp chunked form (any backend; CPU default).
  "pallas"  the Pallas kernels: Triton-lowered on GPU, Mosaic on TPU. On CPU they run only with
            ``interpret=True`` (tests), choosing the variant with ``pallas_backend``; naming
            ``pallas_backend`` without interpret lowers that variant for ahead-of-time compilation
            (e.g. for a TPU topology from a CPU host).
  "auto"    "pallas" on GPU/TPU when the shapes suit the kernel, else "xla".
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from kernels_pallas.lightning import pallas as _pallas
from kernels_pallas.lightning.xla import lightning_attention_xla, lightning_decode_xla

IMPLS = ("auto", "xla", "pallas")
# Tiles per backend: (chunk length, d_v tile).
_TILES = {"gpu": (64, 64), "tpu": (128, 128)}


def _pow2(n: int) -> bool:
    return n >= 16 and (n & (n - 1)) == 0


def _pick(impl: str, dk: int, dv: int, interpret: bool, pallas_backend: str | None) -> str | None:
    """The Pallas backend variant to use, or None for the XLA path."""
    if impl not in IMPLS:
        raise ValueError(f"lightning attention impl={impl!r} is unknown; use one of {IMPLS}.")
    if impl == "xla":
        return None
    platform = jax.default_backend()
    backend = pallas_backend or ("tpu" if platform == "tpu" else "gpu")
    if backend not in _TILES:
        raise ValueError(f"pallas_backend={pallas_backend!r} is unknown; use 'gpu' or 'tpu'.")
    if impl == "auto":
        if platform not in ("gpu", "tpu") or interpret:
            return None
        if backend == "gpu" and not (_pow2(dk) and _pow2(dv)):
            return None  # Triton tiles need power-of-two head dims >= 16
        return backend
    if platform == "cpu" and not interpret and pallas_backend is None:
        raise ValueError(
            "impl='pallas' on CPU needs interpret=True (Pallas kernels only run interpreted on CPU); "
            "use impl='xla' or 'auto' for the fast CPU path."
        )
    return backend


def lightning_attention(
    q,
    k,
    v,
    decay_rate,
    initial_state=None,
    *,
    block_size: int = 256,
    impl: str = "auto",
    interpret: bool = False,
    pallas_backend: str | None = None,
    chunk: int | None = None,
    block_v: int | None = None,
):
    """Lightning attention ``o_t = sum_{tau<=t} exp(-sigma (t-tau)) (q_t.k_tau) v_tau``.

    Args:
      q, k: [batch, seq, heads, d_k]; v: [batch, seq, heads, d_v]; bf16 or f32.
      decay_rate: sigma, [heads], float32 (a constant: no gradient flows to it).
      initial_state: optional [batch, heads, d_k, d_v] float32.
      block_size: chunk length of the XLA path. Any sequence length is accepted. The result does not
        depend on the chunking except for rounding, so Pallas kernels use their own tile (``chunk``).
      impl: "auto" | "xla" | "pallas" (see module doc).
      interpret, pallas_backend: run a Pallas variant ("gpu" or "tpu") in interpret mode (tests).
      chunk, block_v: Pallas tile overrides (chunk length, d_v tile).

    Returns:
      (out [batch, seq, heads, d_v] in q.dtype, final_state [batch, heads, d_k, d_v] float32).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "lightning_attention expects q, k [batch, seq, heads, d_k] and v [batch, seq, heads, d_v]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    chex.assert_shape(jnp.asarray(decay_rate), (h,))
    if initial_state is not None:
        chex.assert_shape(initial_state, (b, h, dk, dv))
    backend = _pick(impl, dk, dv, interpret, pallas_backend)
    if backend is None or t == 0:
        return lightning_attention_xla(q, k, v, decay_rate, initial_state, block_size=block_size)
    c0, bv0 = _TILES[backend]
    bv = min(block_v or bv0, dv)
    if dv % bv:
        raise ValueError(f"block_v={bv} must divide d_v={dv}.")
    kc = _pallas.KernelConfig(backend, chunk or c0, bv, interpret)
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    return _pallas.lightning_attention_pallas(kc, q, k, v, jnp.asarray(decay_rate, jnp.float32), s0)


def lightning_decode(
    q, k, v, decay_rate, state, *, impl: str = "auto", interpret: bool = False, pallas_backend: str | None = None
):
    """One decode step per sequence: S <- exp(-sigma) S + k^T v ; o = q S.

    q, k: [batch, heads, d_k]; v: [batch, heads, d_v]; state [batch, heads, d_k, d_v] float32.
    Returns (out [batch, heads, d_v] in q.dtype, new_state float32).
    """
    chex.assert_rank([q, k, v], 3)
    chex.assert_equal_shape([q, k])
    chex.assert_equal_shape_prefix([q, v], 2)
    chex.assert_shape(state, (*q.shape, v.shape[-1]))
    backend = _pick(impl, q.shape[-1], v.shape[-1], interpret, pallas_backend)
    if backend is None:
        return lightning_decode_xla(q, k, v, decay_rate, state)
    kc = _pallas.KernelConfig(backend, 0, 0, interpret)
    return _pallas.decode(kc, q, k, v, jnp.asarray(decay_rate, jnp.float32), state)
