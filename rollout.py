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

_DEFAULT_CONFIG = "configs/tiny.py"
_CONFIG = cli.define_config("rollout.py", "config", _DEFAULT_CONFIG, "config file (get_config())")
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
    from m1jax.rollout.jsonl import sample_lines

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

    from m1jax import sharding, storage
    from m1jax.checkpoints import runs
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
    from m1jax.checkpoints.hf import CheckpointError
    from m1jax.rollout import SamplingParams, generate
    from m1jax.rollout.jsonl import (check_rollout_config, finished_lines, padded_batch, plan_batches, read_prompts,
                                     sample_lines, write_atomically)

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
        if _CKPT.value and not storage.exists(_CKPT.value):
            raise FileNotFoundError(f"--checkpoint={_CKPT.value}: no such directory (a train.py run, or a "
                                    "transformers/original MiniMax checkpoint directory).")
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
    app.run(main, flags_parser=cli.flags_parser("rollout.py", "config", _DEFAULT_CONFIG))
