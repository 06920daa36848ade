"""MiniMax-M1 (40k/80k share one architecture): 456,089,655,296 parameters, 45.9B active.

Values from the released config.json (MiniMaxAI/MiniMax-M1-40k and -80k).
"""

import ml_collections

from m1jax.model.config import hybrid_layer_types


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=200064,
            hidden_size=6144,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            layer_types=hybrid_layer_types(80, period=8),  # 7 lightning, then 1 softmax
            num_experts=32,
            num_experts_per_tok=2,
            intermediate_size=9216,
            linear_attn_alpha=3.5565588200778455,  # (2 * 80) ** 0.25
            linear_attn_beta=1.0,
            full_attn_alpha=3.5565588200778455,
            full_attn_beta=1.0,
            mlp_alpha=3.5565588200778455,
            mlp_beta=1.0,
            postnorm=True,
            rope_theta=10_000_000.0,
            rotary_dim=64,  # half of each head rotates (original code / vLLM)
            block_size=256,
            rms_norm_eps=1e-5,
            lightning_norm_eps=1e-6,
            router_aux_loss_coef=0.001,
            decay_convention="original",
            max_position_embeddings=10_240_000,
            dtype="bfloat16",
            param_dtype="float32",
            lm_head_fp32=True,
            remat=True,
            # Memory for long sequences (no value changes): each layer rematerialized inside its
            # block, and the experts take a device's tokens 8192 at a time (m1jax.plan: the 80K
            # train step on v5p-1024).
            remat_layers=True,
            moe_chunk=8192,
        )
    )
    # Paper: temperature 1.0, top-p 1.0 for RL sampling; early truncation after 3000 consecutive
    # tokens each with probability > 0.99 (§3.2).
    c.sampling = ml_collections.ConfigDict(
        dict(temperature=1.0, top_p=1.0, top_k=0, greedy=False, max_new_tokens=40960, stop_token_ids=(),
             repetition_window=3000, repetition_prob=0.99, seed=0)
    )
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=16, num_samples=16, max_prompt_len=8192,
        engine="continuous",  # the slot engine (continuous batching); "static": batches run to their longest sample
        slots=0,  # sequences decoded together (0: batch_size x num_samples)
        kv_dtype="",  # "bfloat16": the softmax layers' KV caches in bf16 ("" = the compute dtype)
        record_routing=False,  # also write every token's top-k expert ids (routing replay)
        sort_by_length=False,  # static engine: batch prompts of similar length (less padding)
    ))
    # 8-way expert parallelism (4 of the 32 experts per device), FSDP over all the other devices
    # (`python -m m1jax.plan` checks a pod shape's memory before a run; --mesh=auto picks one).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=8, sequence=1, tensor=1))
    return c
