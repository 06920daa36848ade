"""CISPO on your own prompts: a JSONL file of {"prompt": ..., "answer": ...} lines, scored by math-verify.

    pip install -e ".[math]"
    python train.py --config=configs/math_jsonl.py --config.data.path=problems.jsonl --workdir=runs/math

The default job's tiny model and recipe with a printable-ASCII character tokenizer; the SFT warm
start teaches prompt -> answer + eos on the training lines. For a real model, set
``data.tokenizer`` to a tokenizer.json (or a Hugging Face model directory), ``model.vocab_size`` to
its size, and a reward (``rl.reward``: a registered name, "module:function" or "file.py:function").
"""

import ml_collections

from configs import arith_cispo

PRINTABLE_ASCII = "".join(chr(i) for i in range(32, 127))


def get_config():
    c = arith_cispo.get_config()
    c.data = ml_collections.ConfigDict(dict(
        task="jsonl", path=ml_collections.config_dict.placeholder(str),
        eval_path="",  # "" = hold out the last eval_size lines of path
        eval_size=64, tokenizer="chars:" + PRINTABLE_ASCII, max_prompt_tokens=48, max_new_tokens=16,
    ))
    c.model.vocab_size = 3 + len(PRINTABLE_ASCII)  # pad, bos, eos + the characters
    c.model.max_position_embeddings = 64
    c.rl.reward = "math_verify"
    return c
