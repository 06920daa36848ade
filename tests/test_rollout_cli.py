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
