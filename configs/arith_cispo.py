"""The default job: a tiny hybrid MiniMax model learns 2-digit addition, SFT warm start then CISPO.

    python train.py --config=configs/arith_cispo.py --workdir=runs/arith
"""

import ml_collections

from m1jax.data.arith import VOCAB_SIZE


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ml_collections.config_dict.placeholder(str)  # start from a MiniMax checkpoint directory
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        layer_types=("linear_attention",) * 3 + ("full_attention",), num_experts=4, num_experts_per_tok=2,
        intermediate_size=256, rotary_dim=32, block_size=16, rope_theta=10000.0,
        linear_attn_alpha=1.68, full_attn_alpha=1.68, mlp_alpha=1.68,  # (2 * 4) ** 0.25
        max_position_embeddings=64,
    ))
    c.data = ml_collections.ConfigDict(dict(task="arith", digits=2, eval_size=200, eval_seed=12345))
    # SFT until held-out greedy pass@1 reaches 30% on 2 evaluations in a row (checked every 10 steps),
    # at most 1500 steps: the model learns addition in a jump whose step varies by hundreds between
    # seeds, so a fixed step count would start RL from very different models; one lucky evaluation
    # can stop SFT before the jump, and sparse checks stop it far past the jump's start.
    c.sft = ml_collections.ConfigDict(dict(steps=1500, batch_size=64, stop_at_pass_at_1=0.3, eval_every=10,
                                           stop_evals_in_a_row=2))
    c.sft_optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0,
                                                 max_grad_norm=1.0))
    c.rl = ml_collections.ConfigDict(dict(
        steps=150, prompts_per_step=32, samples_per_prompt=8, updates_per_rollout=1, minibatches=2,
        temperature=1.0, loss="cispo", is_weight_max=5.0, aggregation="token_mean", advantage_std="group",
        dynamic_sampling=True, max_gen_batches=3, reward="exact_match", reward_timeout_s=5.0,
        # pi_old: the sampler's log-probs, or the trainer's forward before the updates (then tis_cap
        # adds the truncated sampler correction as a separate detached factor).
        old_logp="sampler", tis_cap=ml_collections.config_dict.placeholder(float),
        overlong_cache_len=0,  # > 0: DAPO soft overlong penalty over the last this many tokens
        # early truncation: after repetition_window tokens in a row each sampled with p > repetition_prob
        # (None: the config's sampling.repetition_*, the model's; none here: off)
        repetition_window=ml_collections.config_dict.placeholder(int),
        repetition_prob=ml_collections.config_dict.placeholder(float),
        routing_replay=False,  # R3: the trainer's MoE uses the sampler's recorded experts
    ))
    # dynamic sampling draws 1.5x the step's prompts per generation batch: about 80% of groups have
    # signal, so one batch (48 prompts x 8) usually fills the step, where batches of 32 took two.
    c.rl.gen_prompts = c.rl.get_ref("prompts_per_step") * 3 // 2
    # RL's learning rate (per optimizer update: rl.minibatches x rl.updates_per_rollout per RL step):
    # a linear warmup (a fresh Adam's first updates are lr-sized in every parameter: without it the
    # sampled reward dropped from 0.40 to 0.16 in 4 steps), then a cosine decay to 10% at the last RL
    # step, which follows an override of rl.steps.
    c.rl_optim = ml_collections.ConfigDict(dict(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0,
                                                max_grad_norm=1.0, schedule="cosine", min_lr_ratio=0.1))
    rl_updates = c.rl.get_ref("steps") * c.rl.get_ref("minibatches") * c.rl.get_ref("updates_per_rollout")
    c.rl_optim.total_steps = rl_updates  # the cosine's end: the last RL update, warmup included
    # RL rollouts and evaluation on the slot engine (m1jax/rollout/slots.py), fresh slots per call;
    # slots=0: every sample of a call at once; fewer slots are refilled as samples end.
    # engine="static": one batch run until its longest sample ends.
    # kv_dtype: the sampler's softmax-layer KV caches ("" = the compute dtype; "bfloat16" halves them,
    # and the sampler then differs from the trainer: see rl.old_logp / rl.tis_cap).
    c.rollout = ml_collections.ConfigDict(dict(engine="continuous", slots=0, kv_dtype=""))
    # every 100 steps: a save of the model and both optimizers costs about 0.8 s here (2 cores), so
    # every 20 steps cost ~45 s of the job; a crash loses at most 100 steps (about 1-3 minutes).
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2))
    # The devices sampling and training share (m1jax.sharding): sizes of (data, fsdp, expert, tensor),
    # one of them may be -1 (the devices the others leave); e.g. --config.mesh.data=-1 on a TPU host.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1))
    c.max_nonfinite_in_a_row = 5
    c.log_every = 25
    c.crash_after_step = ml_collections.config_dict.placeholder(int)  # testing hook: exit after this step
    return c
