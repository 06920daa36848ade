"""Public lightning-attention ops and implementation dispatch."""

from __future__ import annotations

from kernels_pallas.lightning.xla import lightning_attention_xla, lightning_decode_xla

IMPLS = ("auto", "xla")


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"lightning attention impl={impl!r} is unknown; use one of {IMPLS}.")
    return "xla"


def lightning_attention(q, k, v, decay_rate, initial_state=None, *, block_size: int = 256, impl: str = "auto"):
    """Lightning attention ``o_t = sum_{tau<=t} exp(-sigma (t-tau)) (q_t.k_tau) v_tau``.

    Args:
      q, k: [batch, seq, heads, d_k]; v: [batch, seq, heads, d_v]; bf16 or f32.
      decay_rate: sigma, [heads], float32.
      initial_state: optional [batch, heads, d_k, d_v] float32.
      block_size: block length of the chunked algorithm (any seq length is accepted).
      impl: "auto" picks the best implementation for the backend; "xla" forces the jnp path.

    Returns:
      (out [batch, seq, heads, d_v] in q.dtype, final_state [batch, heads, d_k, d_v] float32).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning_attention expects q, k [batch, seq, heads, d_k] and v [batch, seq, heads, d_v]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}."
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    _check_impl(impl)
    return lightning_attention_xla(q, k, v, decay_rate, initial_state, block_size=block_size)


def lightning_decode(q, k, v, decay_rate, state, *, impl: str = "auto"):
    """One decode step for one new token per sequence. q, k, v: [batch, heads, d]; state fp32."""
    _check_impl(impl)
    return lightning_decode_xla(q, k, v, decay_rate, state)
