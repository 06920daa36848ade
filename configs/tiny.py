"""A CPU-sized model with MiniMax-M1's structure (7 lightning + 1 softmax layer, top-2 of 4 experts).

This is the model of the benchmarks in docs/benchmarks.md (15.3M parameters).
rotary_dim = head_dim so the model is also expressible in transformers 5.x (which rotates the whole
head), for generate()/parity comparisons.
"""

import ml_collections

from m1jax.model.config import hybrid_layer_types


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=512,
            hidden_size=256,
            num_layers=8,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            layer_types=hybrid_layer_types(8, period=8),
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=512,
            linear_attn_alpha=2.0,  # (2 * 8) ** 0.25
            linear_attn_beta=1.0,
            full_attn_alpha=2.0,
            full_attn_beta=1.0,
            mlp_alpha=2.0,
            mlp_beta=1.0,
            postnorm=True,
            rope_theta=10_000_000.0,
            rotary_dim=64,
            block_size=64,
            max_position_embeddings=65536,
            dtype="float32",
            param_dtype="float32",
        )
    )
    c.sampling = ml_collections.ConfigDict(
        dict(temperature=1.0, top_p=1.0, top_k=0, greedy=False, max_new_tokens=64, stop_token_ids=(),
             repetition_window=0, repetition_prob=0.99, seed=0)
    )
    c.rollout = ml_collections.ConfigDict(dict(
        batch_size=8, num_samples=1, max_prompt_len=1024,
        engine="continuous",  # the slot engine (continuous batching); "static": batches run to their longest sample
        slots=0,  # sequences decoded together (0: batch_size x num_samples)
        kv_dtype="",  # "bfloat16": the softmax layers' KV caches in bf16 ("" = the compute dtype)
        record_routing=False,  # also write every token's top-k expert ids (routing replay)
        sort_by_length=False,  # static engine: batch prompts of similar length (less padding)
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1))  # one axis may be -1: the rest
    return c
