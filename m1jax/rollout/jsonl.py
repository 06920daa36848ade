"""rollout.py's files: prompts JSONL in (one prompt per line, bad ones reported, never raised),
sample lines out, and what an interrupted output already holds (``--resume``).

Also the static engine's batching: batches in file order or by length, each left-padded to a
bucketed width and a full batch so that batches share compiled programs.
"""

from __future__ import annotations

import json
import os

from m1jax import storage
from m1jax.rollout.engine import FINISH_REASONS, left_pad
from m1jax.rollout.slots import check_engine_config


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
    """[(index, ids or None, error or None)], index = the line number from 0 -- bad prompts carry an
    error, never raise."""
    out = []
    for n, line in storage.jsonl_lines(path, "prompts file"):
        i = n - 1
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


def check_rollout_config(ro) -> None:
    """Fail before any model is loaded or compiled on a rollout section that cannot run."""
    for key in ("batch_size", "num_samples", "max_prompt_len"):
        value = ro.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rollout.{key}={value!r}: must be an integer >= 1.")
    for key in ("record_routing", "sort_by_length"):
        if not isinstance(ro.get(key, False), bool):
            raise ValueError(f"rollout.{key}={ro[key]!r}: must be True or False.")
    check_engine_config(ro)


def plan_batches(good: list, batch_size: int, by_length: bool = False) -> list[list]:
    """The valid prompts [(index, ids)] in batches of ``batch_size``: in file order, or with
    ``by_length`` sorted by length (ties in file order) so that a batch's prompts need little left
    padding. Deterministic: the same batches, and so the same keys, in a resumed run."""
    order = sorted(good, key=lambda p: len(p[1])) if by_length else good
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def padded_batch(batch: list, rows: int, prefill_chunk: int = 2048):
    """(ids, mask) of a batch's prompts, left-padded to a bucketed width -- a power of two from 16 up
    to ``prefill_chunk``; ``generate`` pads longer prompts to a multiple of the chunk itself -- and,
    with copies of its first prompt, to ``rows`` rows: batches of the same bucket reuse one compiled
    prefill and decode, where each new width or batch size would compile both again (seconds on CPU,
    far longer for a large model)."""
    width = max(len(ids) for _, ids in batch)
    bucket = min(max(16, 1 << (width - 1).bit_length()), max(width, prefill_chunk))
    return left_pad([ids for _, ids in batch], width=bucket, rows=rows)


def finished_lines(path: str, batches: list[list], num_samples: int) -> tuple[set[int], list[str]]:
    """The batches an interrupted output finished, and their sample lines in file order.

    A torn last line and the lines of a partly written batch are not kept (that batch is sampled
    again). A sample these prompts and ``num_samples`` cannot have produced raises ValueError: the
    file was written for other prompts or settings."""
    if not storage.exists(path):
        return set(), []
    lines = storage.read_text(path).split("\n")[:-1]  # the last piece is "" or a torn line
    batch_of = {index: n for n, batch in enumerate(batches) for index, _ in batch}
    ids_of = {index: ids for batch in batches for index, ids in batch}
    written: dict[int, set] = {}
    samples = []
    for no, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"--resume: line {no} of {path} is not JSON, so the file is not a rollout.py output; "
                             "pass a new --output.") from None
        if "error" in row:
            continue  # error lines are written afresh
        index, sample = row.get("index"), row.get("sample")
        if (index not in ids_of or row.get("prompt_ids") != ids_of[index]
                or not isinstance(sample, int) or not 0 <= sample < num_samples):
            raise ValueError(f"--resume: line {no} of {path} (prompt {index}, sample {sample}) does not belong to "
                             f"these prompts with rollout.num_samples={num_samples}: the file was written for other "
                             "prompts or settings. Pass a new --output, or drop --resume to overwrite it.")
        pairs = written.setdefault(batch_of[index], set())
        if (index, sample) not in pairs:
            pairs.add((index, sample))
            samples.append((batch_of[index], line))
    done = {n for n, pairs in written.items() if len(pairs) == len(batches[n]) * num_samples}
    return done, [line for n, line in samples if n in done]


def sample_lines(batch: list, r, num_samples: int, tok=None) -> list[str]:
    """The output lines of one batch's Rollout ``r`` (fetched to the host): one per sample of the
    batch's prompts (rows past them, ``padded_batch``'s padding, are left out)."""
    lines = []
    for row in range(len(batch) * num_samples):
        index, ids = batch[row // num_samples]
        length = int(r.lengths[row])
        completion = r.tokens[row, :length].tolist()
        text = {} if tok is None else {"completion_text": tok.decode(completion)}
        lines.append(json.dumps({
            "index": index, "sample": row % num_samples, "prompt_ids": ids, "completion_ids": completion, **text,
            "logprobs": [round(float(x), 6) for x in r.logprobs[row, :length]],
            "logprobs_truncated": [round(float(x), 6) for x in r.logprobs_truncated[row, :length]],
            "finish_reason": FINISH_REASONS[int(r.finish_reason[row])],
            **({} if r.routing is None else {  # [token][layer][k] expert ids, for routing replay
                "prompt_routing": r.prompt_routing[row // num_samples, r.prompt_routing.shape[1] - len(ids):].tolist(),
                "routing": r.routing[row, :length].tolist()}),
        }))
    return lines


def write_atomically(path: str, lines: list[str]) -> None:
    """``lines`` as the whole file at ``path``, replaced at once (a gs:// object is written whole)."""
    text = "".join(line + "\n" for line in lines)
    if storage.is_remote(path):
        storage.write_text(path, text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
