"""A train.py run exported to a Hugging Face directory: transformers loads it, tokenizes like m1jax
and generates the same greedy tokens as m1jax's rollout engine."""

import os
import subprocess
import sys

import jax
import pytest

from m1jax.checkpoints import runs
from m1jax import tokenizer as tokenizers
from m1jax.data import arith
from m1jax.rollout import SamplingParams, generate

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # train.py on one device, as users run it
TINY = ["--config=configs/arith_cispo.py", "--config.sft.steps=12", "--config.rl.steps=1", "--config.log_every=4",
        "--config.checkpoint.every=100", "--config.data.eval_size=8", "--config.sft.batch_size=16",
        "--config.rl.prompts_per_step=4", "--config.rl.samples_per_prompt=4", "--config.rl.dynamic_sampling=False"]


def test_export_of_a_trained_run_generates_like_m1jax(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir, out = tmp_path / "run", tmp_path / "hf"
    res = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *TINY],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "m1jax.checkpoints.export", f"--workdir={workdir}", f"--out={out}",
                          "--tokenizer=arith"], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "exported step 13" in res.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out))

    hf_model = transformers.MiniMaxForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    problems = arith.eval_set(8, digits=2, seed=7)
    texts = [arith.decode(p.prompt_ids) for p in problems]
    ids = [[hf_tok.bos_token_id] + hf_tok.encode(t, add_special_tokens=False) for t in texts]
    assert ids == [p.prompt_ids for p in problems]  # transformers' tokenizer = the task's encoding

    model, step = runs.restore_model(str(workdir))
    new = 4
    ours = jax.device_get(generate(model, ids, SamplingParams(greedy=True, max_new_tokens=new,
                                                               stop_token_ids=(arith.EOS,))))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long),
                                   do_sample=False, max_new_tokens=new).numpy()[:, len(ids[0]):]
    n_eos = 0
    for i in range(len(ids)):
        mine = ours.tokens[i, :ours.lengths[i]].tolist()
        hf_row = theirs[i].tolist()
        if arith.EOS in hf_row:  # transformers pads after eos; both stop there
            hf_row = hf_row[:hf_row.index(arith.EOS) + 1]
            n_eos += 1
        assert mine == hf_row, (i, mine, hf_row)
    # the model is the trained one (its greedy answers are digit strings), not a random init
    assert all(3 <= t < 13 for t in ours.tokens[:, 0])
    decoded = hf_tok.batch_decode(theirs, skip_special_tokens=True)
    assert decoded == [tokenizers.load("arith").decode(r) for r in theirs]


def test_export_errors(tmp_path):
    from m1jax import storage
    from m1jax.checkpoints import export

    with pytest.raises(storage.StorageError, match="not a train.py run directory"):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="pass a tokenizer.json"):
        export.export(str(tmp_path / "nothing"), str(tmp_path / "out"), tokenizer=str(tmp_path / "no.json"))
