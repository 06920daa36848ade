"""Export a train.py run's checkpoint as a Hugging Face (transformers) model directory.

    python -m m1jax.checkpoints.export --workdir=runs/arith --out=exported/arith --tokenizer=arith [--step=N]

Writes config.json + model.safetensors (``m1jax.checkpoints.hf.save``: transformers' MiniMaxForCausalLM loads
it), and with a tokenizer also tokenizer.json, tokenizer_config.json (special tokens, the
MiniMax-M1 chat template) and generation_config.json (bos/eos/pad ids, so ``generate()`` stops at
eos). The run directory may be local or gs://; the output directory is local.
"""

from __future__ import annotations

import argparse
import json
import os

from m1jax.checkpoints import hf, runs
from m1jax import tokenizer as tokenizers


def save_tokenizer(tok: tokenizers.Tokenizer, out: str) -> None:
    """The tokenizer files of an HF directory for ``tok`` (a loaded tokenizer.json or a CharTokenizer)."""
    if isinstance(tok, tokenizers.HFTokenizer):
        tok.save(out)
    elif isinstance(tok, tokenizers.CharTokenizer):
        pad, bos, eos = tok.specials[:3]
        tokenizers.save_hf_files(tok.to_hf(), out, {"pad_token": pad, "bos_token": bos, "eos_token": eos})
    else:
        raise TypeError(f"cannot write tokenizer files for {type(tok).__name__}.")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, f, indent=2)


def export(workdir: str, out: str, tokenizer: str | None = None, step: int | None = None) -> int:
    """Write checkpoint ``step`` (default: latest) of the run in ``workdir`` to ``out``; returns the step."""
    tok = tokenizers.load(tokenizer) if tokenizer else None  # a bad tokenizer fails before the restore
    model, step = runs.restore_model(workdir, step=step)
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer!r} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.cfg.vocab_size}; export with the tokenizer the run was trained with.")
    hf.save(model, out)
    if tok is not None:
        save_tokenizer(tok, out)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m m1jax.checkpoints.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="train.py run directory (local or gs://)")
    parser.add_argument("--out", required=True, help="output directory (local)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to ship with the model: 'arith', 'chars:...', or a tokenizer.json / directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    step = export(args.workdir, args.out, args.tokenizer, args.step)
    print(f"exported step {step} of {args.workdir} to {args.out}")


if __name__ == "__main__":
    main()
