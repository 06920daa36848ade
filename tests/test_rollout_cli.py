"""rollout.py end to end: a transformers-format checkpoint in, JSONL out, bad prompts reported."""

import json
import os
import re
import subprocess
import sys

import numpy as np

from tests.hf_utils import tiny_hf_model
from tests.lean import lean_env

LEAN = lean_env(dict(os.environ))  # rollout.py on the plain install: no torch, transformers or test tools


def test_rollout_cli(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt_ids": [1, 2, 3]}),
        json.dumps({"prompt_ids": [4, 99999]}),  # out of vocabulary
        json.dumps({"prompt_ids": list(range(1, 40))}),  # too long for max_prompt_len=32
        "not json",
        json.dumps({"prompt_ids": [7, 8]}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "rollout.py", "--config=configs/tiny.py", f"--checkpoint={ckpt}", f"--prompts={prompts}",
           f"--output={out}", "--config.sampling.max_new_tokens=5", "--config.rollout.num_samples=2",
           "--config.rollout.max_prompt_len=32"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=LEAN)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = {r["index"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {1, 2, 3}
    assert "outside the vocabulary" in errors[1] and "max_prompt_len" in errors[2]
    samples = [r for r in rows if "error" not in r]
    assert sorted((r["index"], r["sample"]) for r in samples) == [(0, 0), (0, 1), (4, 0), (4, 1)]
    for r in samples:
        assert len(r["completion_ids"]) == len(r["logprobs"]) == 5 and r["finish_reason"] == "length"


def test_rollout_cli_text_and_chat_prompts(tmp_path):
    """Text and chat-message prompts through the checkpoint's own tokenizer.json (byte-level BPE)."""
    from m1jax import tokenizer as tk
    from tests.test_tokenizer import write_bpe_tokenizer

    ckpt = tmp_path / "ckpt"
    tiny_hf_model(vocab_size=512).save_pretrained(ckpt)
    write_bpe_tokenizer(ckpt)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"text": "The lightning attention"}),
        json.dumps({"messages": chat}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),  # unsupported role
        json.dumps({"nothing": 1}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, "rollout.py", "--config=configs/tiny.py", f"--checkpoint={ckpt}",
                          f"--prompts={prompts}", f"--output={out}", "--config.sampling.max_new_tokens=6"],
                         capture_output=True, text=True, timeout=300, env=LEAN)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "role 'tool'" in rows[2]["error"] and '"prompt_ids", "text" or "messages"' in rows[3]["error"]
    tok = tk.load(str(ckpt))
    assert rows[0]["prompt_ids"] == tok.encode("The lightning attention")
    assert rows[1]["prompt_ids"] == tok.encode(tk.chat_prompt(chat))
    assert rows[1]["prompt_ids"][:2] == [tok.encode(tk.M1_BEGIN_DOCUMENT)[0], tok.bos_id]  # markers are single tokens
    for r in (rows[0], rows[1]):
        assert r["completion_text"] == tok.decode(r["completion_ids"])
        ids = r["completion_ids"]
        # eos stops generation: it can only be the last token, and then the reason is "stop"
        assert tok.eos_id not in ids[:-1] and (r["finish_reason"] == "stop") == (ids[-1] == tok.eos_id)


def test_rollout_cli_text_needs_a_tokenizer(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "hi"}) + "\n" + json.dumps({"prompt_ids": [5, 6]}) + "\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, "rollout.py", "--config=configs/tiny.py", f"--prompts={prompts}",
                          f"--output={out}", "--config.sampling.max_new_tokens=2", "--config.model.num_layers=2",
                          "--config.model.layer_types=('linear_attention','full_attention')"],
                         capture_output=True, text=True, timeout=300, env=LEAN)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "need a tokenizer: pass --tokenizer" in rows[0]["error"]
    assert rows[1]["index"] == 1 and "completion_text" not in rows[1]


def _rollout(ckpt, prompts, out, *flags):
    return subprocess.run([sys.executable, "rollout.py", "--config=configs/tiny.py", f"--checkpoint={ckpt}",
                           f"--prompts={prompts}", f"--output={out}", "--config.sampling.max_new_tokens=4",
                           "--config.rollout.batch_size=1", "--config.rollout.num_samples=2", *flags],
                          capture_output=True, text=True, timeout=300, env=LEAN)


def test_rollout_cli_resumes_an_interrupted_output(tmp_path):
    """A run cut off mid-batch (its last line torn), resumed, ends byte for byte as one uninterrupted
    run: finished prompts are kept, the torn one is sampled again with its own keys."""
    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in ([1, 2, 3], [], [4, 5], [6, 7, 8, 9])) + "\n")
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    res = _rollout(ckpt, prompts, full)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = full.read_text().splitlines(keepends=True)
    assert [json.loads(x).get("index") for x in lines] == [1, 0, 0, 2, 2, 3, 3]  # the error first, then by prompt
    # the crash: prompt 0 written, prompt 2 half written (its second sample torn), prompt 3 never started
    cut.write_text("".join(lines[:4]) + lines[4][:len(lines[4]) // 2])
    res = _rollout(ckpt, prompts, cut, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "keeping 1 finished prompts (2 samples)" in res.stderr
    assert cut.read_text() == full.read_text()
    # a different prompts file does not silently extend the output
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt_ids": [9, 9]}) + "\n")
    res = _rollout(ckpt, other, cut, "--resume")
    assert res.returncode != 0 and "written for other prompts or settings" in res.stderr
    assert cut.read_text() == full.read_text()  # and loses nothing


def test_rollout_cli_rejects_a_bad_rollout_config_before_loading(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    for flag, msg in [("--config.rollout.batch_size=0", "rollout.batch_size=0: must be an integer >= 1"),
                      ("--config.rollout.kv_dtype=int8", "rollout.kv_dtype='int8'"),
                      ("--config.sampling.top_p=0.0", "sampling.top_p: must be in (0, 1]")]:
        res = _rollout(tmp_path / "missing_checkpoint", prompts, tmp_path / "out.jsonl", flag)
        assert res.returncode != 0 and msg in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "out.jsonl").exists()


def test_rollout_cli_bf16_kv_cache(tmp_path):
    """rollout.kv_dtype=bfloat16 samples with a bf16 KV cache: the tiny model's greedy tokens equal the
    fp32 cache's."""
    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [3, 1, 4, 1, 5]}) + "\n")
    rows = {}
    for kv in ("", "bfloat16"):
        out = tmp_path / f"out{kv}.jsonl"
        res = _rollout(ckpt, prompts, out, "--config.sampling.greedy=True", f"--config.rollout.kv_dtype={kv}")
        assert res.returncode == 0, res.stderr[-3000:]
        rows[kv] = [json.loads(x) for x in out.read_text().splitlines()]
    fp32, bf16 = rows[""][0], rows["bfloat16"][0]
    assert fp32["completion_ids"] == bf16["completion_ids"]
    # the cache really is bf16: the log-probs move by its rounding, and no more
    gap = max(abs(a - b) for a, b in zip(fp32["logprobs"], bf16["logprobs"]))
    assert 0 < gap < 1e-2, gap


def test_rollout_cli_on_a_mesh(tmp_path):
    """config.mesh: the checkpoint read straight into its shardings on (data=2, expert=4) over 8 fake
    CPU devices; greedy samples equal one device's, also for a last batch the mesh does not divide."""
    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10],
                                                                         [11, 12])) + "\n")
    rows = {}
    for name, flags in [("one", []), ("mesh", ["--config.mesh.data=2", "--config.mesh.expert=4"])]:
        out = tmp_path / f"{name}.jsonl"
        res = _rollout(ckpt, prompts, out, "--config.sampling.greedy=True", "--config.rollout.batch_size=4",
                       "--config.rollout.num_samples=1", *flags)
        assert res.returncode == 0, res.stderr[-3000:]
        rows[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert "mesh data=2 expert=4: 8 of 8 devices" in res.stderr
    held = [float(x) for x in re.search(r"parameters: ([\d.]+) MiB, ([\d.]+) MiB on device 0", res.stderr).groups()]
    assert held[1] < held[0] / 2, held
    assert [r["index"] for r in rows["mesh"]] == [0, 1, 2, 3, 4]
    for a, b in zip(rows["one"], rows["mesh"]):
        assert a["completion_ids"] == b["completion_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)


def test_rollout_cli_records_routing(tmp_path):
    """rollout.record_routing writes each prompt and completion token's top-k expert ids per layer,
    equal to a full forward pass's routing of the sequence."""
    import jax.numpy as jnp

    from m1jax.checkpoints import hf

    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in ([5, 6, 7, 8, 9], [1, 2, 3])))
    out = tmp_path / "out.jsonl"
    res = _rollout(ckpt, prompts, out, "--config.sampling.greedy=True", "--config.rollout.batch_size=2",
                   "--config.rollout.record_routing=True")
    assert res.returncode == 0, res.stderr[-3000:]
    model = hf.load(str(ckpt))
    for row in map(json.loads, out.read_text().splitlines()):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        assert len(row["prompt_routing"]) == len(prompt) and len(row["routing"]) == len(completion)
        stats = model.forward(jnp.asarray([prompt + completion])).router_stats  # expert_ids [L, T, k]
        ref = np.sort(np.asarray(stats.expert_ids), -1).transpose(1, 0, 2)  # [T, L, k]
        np.testing.assert_array_equal(np.sort(row["prompt_routing"], -1), ref[:len(prompt)])
        np.testing.assert_array_equal(np.sort(row["routing"], -1), ref[len(prompt):])


def test_batches_are_padded_to_a_few_compiled_shapes():
    """rollout.py left-pads each batch to a bucketed width (powers of two from 16 up to the prefill
    chunk; generate pads longer prompts to multiples of the chunk) and to the full batch size, so that
    batches share compiled programs."""
    from m1jax.rollout import jsonl

    ids, mask = jsonl.padded_batch([(0, [1, 2, 3]), (5, [4] * 9)], rows=4)
    assert ids.shape == mask.shape == (4, 16)
    assert mask.sum(1).tolist() == [3, 9, 3, 3] and ids[0, -3:].tolist() == [1, 2, 3] and ids[0, :13].sum() == 0
    assert (ids[2:] == ids[0]).all() and (mask[2:] == mask[0]).all()  # padding rows: copies of the first prompt
    for width, bucket in [(1, 16), (16, 16), (17, 32), (1500, 2048), (2048, 2048), (2049, 2049), (5000, 5000)]:
        assert jsonl.padded_batch([(0, [7] * width)], rows=1)[0].shape == (1, bucket), width
    assert jsonl.padded_batch([(0, [7] * 70)], rows=1, prefill_chunk=96)[0].shape == (1, 96)
    # sort_by_length: batches of similar lengths, ties in file order
    good = [(0, [1] * 9), (1, [1] * 2), (2, [1] * 5), (3, [1] * 2)]
    assert [[i for i, _ in b] for b in jsonl.plan_batches(good, 2, by_length=True)] == [[1, 3], [2, 0]]
    assert [[i for i, _ in b] for b in jsonl.plan_batches(good, 2)] == [[0, 1], [2, 3]]


def test_rollout_cli_sort_by_length(tmp_path):
    """The static engine: rollout.sort_by_length batches prompts of similar length; each prompt's
    greedy completion is the same as in file order (left padding does not change it), and as the
    slot engine's."""
    ckpt = tmp_path / "ckpt"
    tiny_hf_model().save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": list(range(1, n + 1))}) for n in (9, 2, 5, 2)) + "\n")
    rows = {}
    for sort in (False, True, "slots"):
        out = tmp_path / f"out{sort}.jsonl"
        engine = "continuous" if sort == "slots" else "static"
        res = _rollout(ckpt, prompts, out, "--config.sampling.greedy=True", "--config.rollout.batch_size=2",
                       "--config.rollout.num_samples=1", f"--config.rollout.sort_by_length={sort is True}",
                       f"--config.rollout.engine={engine}")
        assert res.returncode == 0, res.stderr[-3000:]
        rows[sort] = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows[False]] == [0, 1, 2, 3] and [r["index"] for r in rows[True]] == [1, 3, 2, 0]
    by_index = {r["index"]: r["completion_ids"] for r in rows[False]}
    assert all(r["completion_ids"] == by_index[r["index"]] for r in rows[True] + rows["slots"])
