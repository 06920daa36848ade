"""Sample completions from a checkpoint to JSONL.

    python rollout.py --config=configs/tiny.py --checkpoint=CKPT --prompts=prompts.jsonl \
        --output=out.jsonl [--tokenizer=TOK] [--config.sampling.temperature=0.7 --config.rollout.num_samples=4]

CKPT is a transformers/original MiniMax directory (config.json + safetensors), or a train.py run
directory, local or gs://bucket/run (its latest orbax checkpoint and its config.json's model).
--config supplies the sampling and rollout settings (and the model when there is no checkpoint).

Prompts: one JSON object per line with "prompt_ids" (token ids), "text" (encoded as is; --bos
prepends the tokenizer's bos id) or "messages" (chat turns [{"role", "content"}], rendered with the
MiniMax-M1 chat template of m1jax/tokenizer.py, generation prompt included). Text and messages need
a tokenizer: --tokenizer (a tokenizer.json or a directory with one, "arith", "chars:...") or the
checkpoint directory's tokenizer.json. With a tokenizer, its eos id also stops generation.

A prompt that is unreadable, empty, too long (config.rollout.max_prompt_len) or holds ids outside
the vocabulary is written to the output with an "error" and skipped; the others proceed. Each output
line is one sample: prompt index, sample index, prompt and completion ids, the decoded completion
("completion_text", with a tokenizer), per-token sampler log-probs (full-vocabulary and truncated;
see m1jax/rollout/sampling.py) and the finish reason (stop, length, repetition).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file (get_config())")
_CKPT = flags.DEFINE_string("checkpoint", None, "transformers/original MiniMax directory, or a train.py run "
                            "directory (local or gs://)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or a directory with one, 'arith' or "
                                 "'chars:...' (default: the checkpoint directory's tokenizer.json, if any)")
_BOS = flags.DEFINE_bool("bos", False, "prepend the tokenizer's bos id to \"text\" prompts")
_PROMPTS = flags.DEFINE_string("prompts", None, "input JSONL", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "output JSONL", required=True)


def prompt_ids(rec: dict, tokenizer=None, bos: bool = False) -> list[int]:
    """Token ids of one prompt record ("prompt_ids", "text" or "messages"); ValueError if unusable."""
    from m1jax.tokenizer import chat_prompt

    if not isinstance(rec, dict):
        raise ValueError("each line must be a JSON object")
    if "prompt_ids" in rec:
        ids = rec["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            raise ValueError("prompt_ids must be a list of integers")
        return ids
    if "text" not in rec and "messages" not in rec:
        raise ValueError('give "prompt_ids", "text" or "messages"')
    if tokenizer is None:
        raise ValueError('"text" and "messages" prompts need a tokenizer: pass --tokenizer')
    if "messages" in rec:
        return tokenizer.encode(chat_prompt(rec["messages"]))
    if not isinstance(rec["text"], str):
        raise ValueError('"text" must be a string')
    ids = tokenizer.encode(rec["text"])
    return [tokenizer.bos_id] + ids if bos and tokenizer.bos_id is not None else ids


def read_prompts(path: str, vocab_size: int, max_len: int, tokenizer=None, bos: bool = False):
    """[(index, ids or None, error or None)] -- bad prompts carry an error, never raise."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                ids = prompt_ids(json.loads(line), tokenizer, bos)
            except (ValueError, KeyError, TypeError, IndexError) as e:
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


def load_model(checkpoint: str | None, config):
    """The model of a train.py run (local or gs://), of a MiniMax checkpoint directory, or (no
    checkpoint) a randomly initialized model of ``config.model``."""
    from flax import nnx

    from m1jax import runs, storage
    from m1jax.configs import model_config
    from m1jax.model import MiniMaxM1

    if not checkpoint:
        print("no --checkpoint: sampling from a randomly initialized model of the config", file=sys.stderr)
        return MiniMaxM1(model_config(config), rngs=nnx.Rngs(0))
    if storage.is_remote(checkpoint) or runs.is_run_dir(checkpoint):
        model, step = runs.restore_model(checkpoint)
        print(f"restored step {step} of the train.py run {checkpoint}", file=sys.stderr)
        return model
    return runs.load_model(checkpoint)  # a MiniMax checkpoint directory


def main(argv):
    del argv
    import dataclasses

    import jax

    from m1jax import tokenizer as tokenizers
    from m1jax.rollout import FINISH_REASONS, SamplingParams, generate

    config = _CONFIG.value
    tok = None
    if _TOKENIZER.value:
        tok = tokenizers.load(_TOKENIZER.value)
    elif _CKPT.value and os.path.exists(os.path.join(_CKPT.value, "tokenizer.json")):
        tok = tokenizers.load(_CKPT.value)
    model = load_model(_CKPT.value, config)
    sp = SamplingParams(**{k: (tuple(v) if k == "stop_token_ids" else v) for k, v in config.sampling.items()})
    if tok is not None and tok.eos_id not in sp.stop_token_ids:
        sp = dataclasses.replace(sp, stop_token_ids=sp.stop_token_ids + (tok.eos_id,))
    ro = config.rollout
    prompts = read_prompts(_PROMPTS.value, model.cfg.vocab_size, ro.max_prompt_len, tok, _BOS.value)
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
                completion = r.tokens[row, :n].tolist()
                text = {} if tok is None else {"completion_text": tok.decode(completion)}
                out.write(json.dumps({
                    "index": idx, "sample": row % ro.num_samples, "prompt_ids": ids,
                    "completion_ids": completion, **text,
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
