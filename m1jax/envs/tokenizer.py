"""The byte-level tokenizer of text environments: ids 0 pad, 1 bos, 2 eos, 3 + b for UTF-8 byte b.

Any environment's text encodes without a vocabulary file, so a tiny model can train on a mixture of
environments (configs/curriculum_tiny.py). Real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 3 + 256


def encode(text: str) -> list[int]:
    return [3 + b for b in text.encode("utf-8")]


def decode(ids) -> str:
    """Text up to the first eos (pad/bos skipped); invalid UTF-8 becomes U+FFFD."""
    out = bytearray()
    for t in ids:
        t = int(t)
        if t == EOS:
            break
        if t >= 3:
            out.append(t - 3)
    return out.decode("utf-8", errors="replace")


def prompt_ids(text: str, width: int) -> list[int]:
    """bos + the prompt's bytes, left-padded with PAD to ``width`` tokens.

    The pads are ordinary input tokens (no attention mask): rollout and the training forward see the
    same sequence, so sampler and trainer log-probs agree, and every prompt of a batch has the same
    width whatever its environment."""
    ids = [BOS] + encode(text)
    if len(ids) > width:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds data.prompt_len={width}: raise data.prompt_len "
                         f"or shorten the environment's prompts ({text[:60]!r}...)")
    return [PAD] * (width - len(ids)) + ids
