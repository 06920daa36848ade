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
see m1jax/rollout/sampling.py) and the finish reason (stop, length, repetition); with
config.rollout.record_routing, also the top-k expert ids of every prompt and completion token in
every layer ("prompt_routing", "routing": [token][layer][k]), for routing replay in training.

Sampling runs on config.rollout.slots slots (0: batch_size x num_samples) with continuous batching
(config.rollout.engine="continuous", m1jax/rollout/slots.py): a slot whose sample has ended takes the
next pending sample at once. Each sample has a key of its own (the seed folded with its prompt's line
number and its sample number), so it does not depend on the slots it shared. A prompt's lines are
written (and synced) as soon as all its samples are done, and at the end the file is rewritten in
order: the errors, then the samples by prompt and sample. --resume continues an interrupted output:
it keeps the prompts whose samples were all written and samples the rest; with the same prompts,
config and seed the file ends byte for byte as one uninterrupted run's.

config.rollout.engine="static" samples in static batches of batch_size prompts instead (in file
order, or by length with sort_by_length), each run until its longest sample ends, with a key per
batch (the seed folded with the batch's number), written in batch order; --resume keeps finished
batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from m1jax import cli, distributed

_CONFIG = cli.define_config("rollout.py", "config", "configs/tiny.py", "config file (get_config())")
_CKPT = flags.DEFINE_string("checkpoint", None, "transformers/original MiniMax directory, or a train.py run "
                            "directory (local or gs://)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or a directory with one, 'arith' or "
                                 "'chars:...' (default: the checkpoint directory's tokenizer.json, if any)")
_BOS = flags.DEFINE_bool("bos", False, "prepend the tokenizer's bos id to \"text\" prompts")
_PROMPTS = flags.DEFINE_string("prompts", None, "input JSONL (local or gs://); required")
_OUTPUT = flags.DEFINE_string("output", None, "output JSONL (local or gs://); required")
_PROCESS_FLAGS = distributed.define_flags()  # multi-host: the same command on every host
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config (file + overrides) and exit")
_RESUME = flags.DEFINE_bool("resume", False, "continue an interrupted --output: keep its finished batches and sample "
                            "the rest (without it, --output is overwritten)")


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
    from m1jax import storage

    out = []
    for i, line in enumerate(storage.read_text(path).split("\n")):  # not splitlines: JSON may hold \u2028
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


def check_rollout_config(ro) -> None:
    """Fail before any model is loaded or compiled on a rollout section that cannot run."""
    for key in ("batch_size", "num_samples", "max_prompt_len"):
        value = ro.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rollout.{key}={value!r}: must be an integer >= 1.")
    for key in ("record_routing", "sort_by_length"):
        if not isinstance(ro.get(key, False), bool):
            raise ValueError(f"rollout.{key}={ro[key]!r}: must be True or False.")
    if ro.get("engine", "continuous") not in ("continuous", "static"):
        raise ValueError(f"rollout.engine={ro.engine!r}: use 'continuous' (the slot engine) or 'static'.")
    slots = ro.get("slots", 0)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        raise ValueError(f"rollout.slots={slots!r}: must be an integer >= 0 (0: batch_size x num_samples).")
    kv = ro.get("kv_dtype", "")
    if kv not in ("", "float32", "bfloat16"):
        raise ValueError(f"rollout.kv_dtype={kv!r}: use '' (the model's compute dtype), 'float32' or 'bfloat16'.")


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
    from m1jax.rollout import left_pad

    ids, mask = left_pad([ids for _, ids in batch])
    width = ids.shape[1]
    bucket = min(max(16, 1 << (width - 1).bit_length()), max(width, prefill_chunk))
    pad = ((0, rows - len(batch)), (bucket - width, 0))
    ids, mask = np.pad(ids, pad), np.pad(mask, pad)
    ids[len(batch):], mask[len(batch):] = ids[0], mask[0]
    return ids, mask


def finished_lines(path: str, batches: list[list], num_samples: int) -> tuple[set[int], list[str]]:
    """The batches an interrupted output finished, and their sample lines in file order.

    A torn last line and the lines of a partly written batch are not kept (that batch is sampled
    again). A sample these prompts and ``num_samples`` cannot have produced raises ValueError: the
    file was written for other prompts or settings."""
    from m1jax import storage

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
    from m1jax.rollout import FINISH_REASONS

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
    from m1jax import storage

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


def progress(done: int, total: int, start: float, tokens: int):
    width = 30
    frac = done / max(total, 1)
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r[{'#' * int(width * frac):<{width}}] {done}/{total} prompts, {rate:,.0f} tokens/s")
    sys.stderr.flush()


def sample_continuously(model, good: list, done: set, kept: list, sp, ro, tok, seed_key, shards: int,
                        primary: bool) -> list[str]:
    """Sample the prompts of ``good`` [(index, ids)] not in ``done`` (positions in good) on the slot
    engine, appending each prompt's lines to the output as soon as its samples are done. Returns the
    new lines. The slots' prompt width is the bucket of the longest of all ``good`` prompts, and the
    keys fold in the prompts' line numbers, so a resumed run samples exactly what one run would."""
    from m1jax import storage
    from m1jax.rollout import generate_slots

    todo = [p for n, p in enumerate(good) if n not in done]
    slots = ro.get("slots", 0) or ro.batch_size * ro.num_samples
    slots = -(-slots // shards) * shards
    lines, start, tokens = [], time.perf_counter(), 0
    with storage.open_append(_OUTPUT.value) if primary else contextlib.nullcontext() as out:
        def on_done(p, r):
            nonlocal tokens
            tokens += int(r.lengths.sum())
            new = sample_lines([todo[p]], r, ro.num_samples, tok)
            lines.extend(new)
            if out:  # synced: a crash loses the prompts in flight only
                out.write("".join(line + "\n" for line in new))
                out.flush()
                if not storage.is_remote(_OUTPUT.value):
                    os.fsync(out.fileno())
                progress(len(good) - len(todo) + len(lines) // ro.num_samples, len(good), start, tokens)

        if todo:
            generate_slots(model, [ids for _, ids in todo], sp, ro.num_samples, slots=slots,
                           prompt_index=[i for i, _ in todo], key=seed_key,
                           prompt_width=max(len(ids) for _, ids in good), kv_dtype=ro.get("kv_dtype") or None,
                           record_routing=ro.get("record_routing", False), on_done=on_done)
    return lines


def load_model(checkpoint: str | None, config, mesh):
    """The model of a train.py run (local or gs://), of a MiniMax checkpoint directory, or (no
    checkpoint) a randomly initialized model of ``config.model``: on a mesh of several devices every
    parameter in its sharding, on one device as is."""
    from flax import nnx

    from m1jax import runs, sharding, storage
    from m1jax.configs import model_config
    from m1jax.model import MiniMaxM1

    if not checkpoint:
        print("no --checkpoint: sampling from a randomly initialized model of the config", file=sys.stderr)
        cfg = model_config(config)
        sharding.validate_model_for_mesh(cfg, mesh)
        return sharding.build_on_mesh(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0)), mesh)
    sharded = mesh if mesh.size > 1 else None
    if storage.is_remote(checkpoint) or runs.is_run_dir(checkpoint):
        model, step = runs.restore_model(checkpoint, mesh=sharded)
        print(f"restored step {step} of the train.py run {checkpoint}", file=sys.stderr)
        return model
    return runs.load_model(checkpoint, mesh=sharded)  # a MiniMax checkpoint directory


def main(argv):
    del argv
    if _PRINT_CONFIG.value:
        return cli.print_config(_CONFIG.value)
    distributed.maybe_initialize(*(f.value for f in _PROCESS_FLAGS))  # before any other JAX call
    import dataclasses

    import jax

    from m1jax import sharding, storage
    from m1jax import tokenizer as tokenizers
    from m1jax.hf import CheckpointError
    from m1jax.rollout import SamplingParams, generate

    config = _CONFIG.value
    # A mistake (config, mesh, missing prompts or checkpoint) is one line and exit code 2, before
    # anything is compiled or written.
    with cli.user_errors("rollout.py", CheckpointError):
        for name, value in (("prompts", _PROMPTS.value), ("output", _OUTPUT.value)):
            if not value:
                raise ValueError(f"--{name} is required: a JSONL file (local or gs://).")
        ro = config.rollout
        check_rollout_config(ro)
        storage.check_bucket(_OUTPUT.value)  # a gs:// output's bucket must exist: fail before any work
        if not storage.exists(_PROMPTS.value):
            raise FileNotFoundError(f"--prompts={_PROMPTS.value}: no such file (a JSONL file, local or gs://).")
        if _CKPT.value and not storage.exists(_CKPT.value):
            raise FileNotFoundError(f"--checkpoint={_CKPT.value}: no such directory (a train.py run, or a "
                                    "transformers/original MiniMax checkpoint directory).")
        mesh = sharding.mesh_from_config(config.get("mesh") and config.mesh.to_dict())
        print(sharding.describe_mesh(mesh), file=sys.stderr)
        tok = None
        if _TOKENIZER.value:
            tok = tokenizers.load(_TOKENIZER.value)
        elif _CKPT.value and os.path.exists(os.path.join(_CKPT.value, "tokenizer.json")):
            tok = tokenizers.load(_CKPT.value)
        sp = SamplingParams(**{k: (tuple(v) if k == "stop_token_ids" else v) for k, v in config.sampling.items()})
        if tok is not None and tok.eos_id not in sp.stop_token_ids:
            sp = dataclasses.replace(sp, stop_token_ids=sp.stop_token_ids + (tok.eos_id,))
        if mesh.size > 1:  # sample on the mesh: parameters sharded, the MoE expert-parallel
            jax.set_mesh(mesh)
        model = load_model(_CKPT.value, config, mesh)
        print(sharding.describe_params(model), file=sys.stderr)
        prompts = read_prompts(_PROMPTS.value, model.cfg.vocab_size, ro.max_prompt_len, tok, _BOS.value)
    good = [(i, ids) for i, ids, err in prompts if err is None]
    continuous = ro.get("engine", "continuous") == "continuous"
    # continuous: each prompt is its own unit of resumption; static: each batch
    batches = [[p] for p in good] if continuous else plan_batches(good, ro.batch_size, ro.get("sort_by_length", False))
    primary = distributed.is_primary()  # in a multi-process run process 0 reads and writes the output
    done, kept = finished_lines(_OUTPUT.value, batches, ro.num_samples) if _RESUME.value and primary else (set(), [])
    # every process samples the same batches (the generation is one program over all of them)
    done = set(np.flatnonzero(distributed.from_primary(np.isin(np.arange(len(batches)), list(done)))).tolist())
    if done:
        print(f"--resume: keeping {len(done)} finished {'prompts' if continuous else 'batches'} ({len(kept)} "
              f"samples) of {_OUTPUT.value}", file=sys.stderr)
    if primary:
        if not storage.is_remote(_OUTPUT.value):
            os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        errors = [json.dumps({"index": i, "error": err}) for i, _, err in prompts if err is not None]
        write_atomically(_OUTPUT.value, errors + kept)
    else:
        errors = []
    start, tokens, finished = time.perf_counter(), 0, sum(len(batches[n]) for n in done)
    seed_key = jax.random.key(sp.seed)
    if continuous:
        errors = errors if primary else []
        new = sample_continuously(model, good, done, kept, sp, ro, tok, seed_key, sharding.batch_shards(mesh), primary)
        if primary:  # the final order, whatever order the prompts finished in: errors, then by prompt and sample
            order = lambda line: (json.loads(line)["index"], json.loads(line)["sample"])  # noqa: E731
            write_atomically(_OUTPUT.value, errors + sorted(kept + new, key=order))
            sys.stderr.write("\n")
            print(f"wrote {len(good) * ro.num_samples} samples ({len(kept)} kept from the interrupted run, "
                  f"{len(prompts) - len(good)} prompts rejected) to {_OUTPUT.value}")
        return
    with storage.open_append(_OUTPUT.value) if primary else contextlib.nullcontext() as out:
        for n, batch in enumerate(batches):
            if n in done:
                continue
            ids, mask = padded_batch(batch, ro.batch_size)
            r = distributed.fetch(generate(model, ids, sp, num_samples=ro.num_samples, prompt_mask=mask,
                                           key=jax.random.fold_in(seed_key, n), kv_dtype=ro.get("kv_dtype") or None,
                                           record_routing=ro.get("record_routing", False)))
            tokens += int(r.lengths[:len(batch) * ro.num_samples].sum())  # not the padding rows
            finished += len(batch)
            if out:  # one batch at a time, synced: a crash loses at most the batch in flight
                out.write("".join(line + "\n" for line in sample_lines(batch, r, ro.num_samples, tok)))
                out.flush()  # durable on gs:// (the object is rewritten); local files are also synced:
                if not storage.is_remote(_OUTPUT.value):
                    os.fsync(out.fileno())
                progress(finished, len(good), start, tokens)
    if primary:
        sys.stderr.write("\n")
        print(f"wrote {len(good) * ro.num_samples} samples ({len(kept)} kept from the interrupted run, "
              f"{len(prompts) - len(good)} prompts rejected) to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser("rollout.py", "config", "configs/tiny.py"))
