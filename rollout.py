"""Sample completions from a checkpoint to JSONL.

    python rollout.py --config=configs/tiny.py --checkpoint=HF_DIR --prompts=prompts.jsonl \
        --output=out.jsonl [--config.sampling.temperature=0.7 --config.rollout.num_samples=4]

Prompts: one JSON object per line with "prompt_ids" (token ids). A prompt that is empty, too long
(config.rollout.max_prompt_len) or holds ids outside the vocabulary is written to the output with
an "error" and skipped; the others proceed. Each output line is one sample: prompt index, sample
index, completion ids, per-token sampler log-probs (full-vocabulary and truncated; see
m1jax/rollout/sampling.py) and the finish reason (stop, length, repetition).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file (get_config())")
_CKPT = flags.DEFINE_string("checkpoint", None, "checkpoint directory: transformers/original MiniMax format")
_PROMPTS = flags.DEFINE_string("prompts", None, "input JSONL", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output JSONL", required=True)


def read_prompts(path: str, vocab_size: int, max_len: int):
    """[(index, ids or None, error or None)] -- bad prompts carry an error, never raise."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids = rec["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
                    raise ValueError("prompt_ids must be a list of integers")
            except (ValueError, KeyError, TypeError) as e:
                out.append((i, None, f"unreadable prompt: {e}"))
                continue
            if not ids:
                out.append((i, None, "empty prompt"))
            elif len(ids) > max_len:
                out.append((i, None, f"prompt has {len(ids)} tokens > rollout.max_prompt_len={max_len}"))
            elif any(x < 0 or x >= vocab_size for x in ids):
                bad = sorted({x for x in ids if x < 0 or x >= vocab_size})[:5]
                out.append((i, None, f"token ids {bad} outside the vocabulary [0, {vocab_size})"))
            else:
                out.append((i, ids, None))
    return out


def progress(done: int, total: int, start: float, tokens: int):
    width = 30
    frac = done / max(total, 1)
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r[{'#' * int(width * frac):<{width}}] {done}/{total} prompts, {rate:,.0f} tokens/s")
    sys.stderr.flush()


def main(argv):
    del argv
    import jax
    from flax import nnx

    from m1jax import hf
    from m1jax.configs import model_config
    from m1jax.model import MiniMaxM1
    from m1jax.rollout import FINISH_REASONS, SamplingParams, generate

    config = _CONFIG.value
    if _CKPT.value:
        model = hf.load(_CKPT.value)
    else:
        print("no --checkpoint: sampling from a randomly initialized model of the config", file=sys.stderr)
        model = MiniMaxM1(model_config(config), rngs=nnx.Rngs(0))
    sp = SamplingParams(**{k: (tuple(v) if k == "stop_token_ids" else v) for k, v in config.sampling.items()})
    ro = config.rollout
    prompts = read_prompts(_PROMPTS.value, model.cfg.vocab_size, ro.max_prompt_len)
    good = [(i, ids) for i, ids, err in prompts if err is None]
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    start, tokens = time.perf_counter(), 0
    key = jax.random.key(sp.seed)
    with open(_OUTPUT.value, "w") as out:
        for i, ids, err in prompts:
            if err is not None:
                out.write(json.dumps({"index": i, "error": err}) + "\n")
        for b in range(0, len(good), ro.batch_size):
            batch = good[b:b + ro.batch_size]
            key, sub = jax.random.split(key)
            r = jax.device_get(generate(model, [ids for _, ids in batch], sp, num_samples=ro.num_samples, key=sub))
            for row in range(len(batch) * ro.num_samples):
                idx, ids = batch[row // ro.num_samples]
                n = int(r.lengths[row])
                tokens += n
                out.write(json.dumps({
                    "index": idx, "sample": row % ro.num_samples, "prompt_ids": ids,
                    "completion_ids": r.tokens[row, :n].tolist(),
                    "logprobs": [round(float(x), 6) for x in r.logprobs[row, :n]],
                    "logprobs_truncated": [round(float(x), 6) for x in r.logprobs_truncated[row, :n]],
                    "finish_reason": FINISH_REASONS[int(r.finish_reason[row])],
                }) + "\n")
            progress(b + len(batch), len(good), start, tokens)
    sys.stderr.write("\n")
    n_err = len(prompts) - len(good)
    print(f"wrote {len(good) * ro.num_samples} samples ({n_err} prompts rejected) to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
