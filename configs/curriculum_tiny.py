"""A CI-sized environment curriculum with staged generation length (MiniMax-M1 §4.3 and §5).

    python train.py --config=configs/curriculum_tiny.py --workdir=runs/curriculum

Two logic environments (sort, boolean) replace the default job's arithmetic: the mixture starts with
sort only and moves linearly to half-and-half by RL step 4; the generation window starts at 16
tokens and grows to 24 when the p99 response length nears it and generation perplexity has
settled, or at RL step 3 at the latest. metrics.jsonl logs curriculum/weight/*, env/*/...,
length/window and both length signals every RL step.
"""

import string

import ml_collections

from configs import arith_cispo

CHARS = string.printable  # the environments' prompts and answers are ASCII


def get_config():
    c = arith_cispo.get_config()
    c.model.vocab_size = 3 + len(CHARS)
    c.model.max_position_embeddings = 128
    c.curriculum = ml_collections.ConfigDict(dict(
        envs=dict(sort=dict(env="sort", args=dict(difficulty=1)), boolean=dict(env="boolean", args=dict(difficulty=1))),
        schedule=dict(steps=(0, 4), weights=dict(sort=(1.0, 0.5), boolean=(0.0, 0.5)), interpolation="linear"),
        tokenizer="chars:" + CHARS, max_prompt_tokens=72, max_new_tokens=24, eval_size_per_env=16, eval_seed=777,
    ))
    # the longer window clips gradients harder and caps CISPO's IS weight lower (the paper's late-stage fix)
    c.length = ml_collections.ConfigDict(dict(windows=(16, 24), advance_at=(3,), p99_frac=0.9, ppl_window=3,
                                              ppl_tol=0.05, max_grad_norm=(1.0, 0.5), is_weight_max=(5.0, 3.0)))
    c.sft.steps, c.sft.batch_size = 60, 32
    c.rl.steps, c.rl.prompts_per_step, c.rl.samples_per_prompt = 8, 8, 4
    c.checkpoint.every = 4
    c.log_every = 5
    return c
