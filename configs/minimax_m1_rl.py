"""The paper's RL recipe on MiniMax-M1 (456B): CISPO from an M1 checkpoint on your prompts, the
generation window staged 40K -> 80K.

    # check it on the pod's devices (builds nothing, compiles nothing, writes nothing):
    python train.py --config=configs/minimax_m1_rl.py --config.data.path=gs://b/math.jsonl \\
        --config.data.tokenizer=/ckpt/MiniMax-M1-40k --config.init_from=/ckpt/MiniMax-M1-40k --dry_run
    # plan the same run's programs for a TPU slice (on any machine, libtpu's compiler):
    python -m m1jax.plan --config=configs/minimax_m1_rl.py --topology=v5p-1024 --program=train
    # train (the same command on every host):
    python train.py --config=configs/minimax_m1_rl.py --config.data.path=... --workdir=gs://b/runs/m1

From the paper (§3.1-§3.2, §4-§5 and spec/rl-landscape.md): CISPO with no lower bound on the IS
weight and no KL; group-normalized advantages; DAPO dynamic sampling and soft overlong penalty;
AdamW b1 0.9, b2 0.95, eps 1e-15, constant lr 1e-6 after a short warmup, gradient clip 1.0;
512 prompts x G = 16 samples per rollout in 16 optimizer updates (512-response minibatches);
temperature 1.0 and top-p 1.0; early truncation after 3000 tokens in a row each with p > 0.99;
windows 40K -> 48K -> 56K -> 64K -> 72K -> 80K, advancing when the p99 length nears the window and
generation perplexity has settled. Not reported by the paper, chosen here: the IS-weight cap
(5.0, ScaleRL's, lowered to 4.0 and 3.0 in the last two windows) and the clip of those windows
(0.5), the "lower both" fix of §5 for late-stage pattern collapse; the overlong cache (4096).
"""

import ml_collections

from configs import minimax_m1

K = 1024
WINDOWS = (40 * K, 48 * K, 56 * K, 64 * K, 72 * K, 80 * K)


def get_config():
    c = minimax_m1.get_config()  # model, sampling (repetition 3000 / 0.99), rollout, mesh
    c.seed = 0
    c.init_from = ml_collections.config_dict.placeholder(str)  # an M1 checkpoint directory (HF or original)
    c.sampling.max_new_tokens = WINDOWS[-1]  # m1jax.plan's default train length: prompt + the last window
    c.data = ml_collections.ConfigDict(dict(
        task="jsonl", path=ml_collections.config_dict.placeholder(str),  # {"prompt", "answer"} lines
        eval_path="", eval_size=64,
        tokenizer=ml_collections.config_dict.placeholder(str),  # M1's tokenizer.json (or its directory)
        max_prompt_tokens=c.rollout.max_prompt_len, max_new_tokens=WINDOWS[-1],
    ))
    c.sft = ml_collections.ConfigDict(dict(steps=0, batch_size=512, stop_at_pass_at_1=None, eval_every=50,
                                           stop_evals_in_a_row=1))  # RL only: M1 starts from its own SFT
    optim = dict(learning_rate=1e-6, warmup_steps=20, weight_decay=0.0, max_grad_norm=1.0,
                 b1=0.9, b2=0.95, eps=1e-15)
    c.sft_optim = ml_collections.ConfigDict(optim)
    c.rl_optim = ml_collections.ConfigDict(optim)
    c.rl = ml_collections.ConfigDict(dict(
        steps=1000, prompts_per_step=512, samples_per_prompt=16, updates_per_rollout=1, minibatches=16,
        temperature=1.0, loss="cispo", is_weight_max=5.0, aggregation="token_mean", advantage_std="group",
        dynamic_sampling=True, max_gen_batches=3, reward="math_verify", reward_timeout_s=10.0,
        old_logp="sampler", tis_cap=ml_collections.config_dict.placeholder(float), overlong_cache_len=4 * K,
        # None: sampling.repetition_window / repetition_prob (3000 / 0.99, configs/minimax_m1.py)
        repetition_window=ml_collections.config_dict.placeholder(int),
        repetition_prob=ml_collections.config_dict.placeholder(float),
        routing_replay=False,  # True: R3, the sampler's experts replayed in training
    ))
    c.length = ml_collections.ConfigDict(dict(
        windows=WINDOWS, advance_at=(None,) * (len(WINDOWS) - 1), p99_frac=0.9, ppl_window=8, ppl_tol=0.02,
        max_grad_norm=(1.0, 1.0, 1.0, 1.0, 0.5, 0.5), is_weight_max=(5.0, 5.0, 5.0, 5.0, 4.0, 3.0),
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=3))
    c.max_nonfinite_in_a_row = 5
    c.log_every = 1
    c.crash_after_step = ml_collections.config_dict.placeholder(int)
    return c
