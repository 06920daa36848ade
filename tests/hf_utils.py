"""Tiny transformers MiniMax models for parity tests (torch imported only in tests)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

LIN, FULL = "linear_attention", "full_attention"


def tiny_hf_config(**kw) -> MiniMaxConfig:
    base = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, block_size=4,
        layer_types=[LIN, FULL, LIN, FULL, LIN],
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        full_attn_alpha_factor=1.7, full_attn_beta_factor=0.8,
        linear_attn_alpha_factor=1.3, linear_attn_beta_factor=1.1,
        mlp_alpha_factor=1.5, mlp_beta_factor=0.9,
    )
    base.update(kw)
    return MiniMaxConfig(**base)


def tiny_hf_model(seed: int = 0, std: float = 0.15, **kw) -> MiniMaxForCausalLM:
    """A random HF MiniMax with weights large enough that decay/RoPE/routing errors show in logits."""
    torch.manual_seed(seed)
    model = MiniMaxForCausalLM(tiny_hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()
