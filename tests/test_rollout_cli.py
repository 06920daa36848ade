"""rollout.py end to end: a transformers-format checkpoint in, JSONL out, bad prompts reported."""

import json
import subprocess
import sys

from tests.hf_utils import tiny_hf_model


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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
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
                         capture_output=True, text=True, timeout=300)
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
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "need a tokenizer: pass --tokenizer" in rows[0]["error"]
    assert rows[1]["index"] == 1 and "completion_text" not in rows[1]
