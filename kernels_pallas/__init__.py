"""Lightning-attention kernels (Pallas for TPU/GPU, pure XLA fallback). Independent of m1jax."""

from kernels_pallas.lightning import (
    combine_sequence_shards,
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_sequential,
    lightning_attention_xla,
    lightning_decode,
    lightning_decode_xla,
)

__all__ = [
    "combine_sequence_shards",
    "lightning_attention",
    "lightning_decode",
    "lightning_attention_naive",
    "lightning_attention_sequential",
    "lightning_attention_xla",
    "lightning_decode_xla",
]
