from kernels_pallas.lightning.api import lightning_attention, lightning_decode
from kernels_pallas.lightning.parallel import combine_sequence_shards
from kernels_pallas.lightning.reference import lightning_attention_naive, lightning_attention_sequential
from kernels_pallas.lightning.xla import lightning_attention_xla, lightning_decode_xla

__all__ = [
    "combine_sequence_shards",
    "lightning_attention",
    "lightning_decode",
    "lightning_attention_naive",
    "lightning_attention_sequential",
    "lightning_attention_xla",
    "lightning_decode_xla",
]
