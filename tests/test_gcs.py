"""train.py and rollout.py on gs:// paths, against a local Cloud Storage emulator (tests/gcs_fixture.py)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from m1jax import sharding as shd, storage
from m1jax.checkpoints import runs
from tests.gcs_fixture import BUCKET, gcs  # noqa: F401 -- the fixture

# train.py as a user runs it (one CPU device), as in tests/test_train.py.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
TINY = ["--config=configs/arith_cispo.py", "--config.sft.steps=3", "--config.rl.steps=2", "--config.log_every=1",
        "--config.checkpoint.every=2", "--config.data.eval_size=8", "--config.sft.batch_size=8",
        "--config.rl.prompts_per_step=4", "--config.rl.samples_per_prompt=4", "--config.rl.dynamic_sampling=False"]


def train(workdir, *extra):
    return subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *TINY, *extra],
                          capture_output=True, text=True, timeout=600, env={**ENV, **_gcs_env()})


def _gcs_env():
    return {k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                       "GOOGLE_AUTH_TOKEN_FOR_TESTING")}


@pytest.fixture(scope="module")
def gcs_run(gcs):  # noqa: F811
    """A run on gs:// that crashed after step 3 (checkpoint at step 2) and was resumed to the end."""
    workdir = f"gs://{BUCKET}/runs/arith"
    crashed = train(workdir, "--config.crash_after_step=3")
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr + crashed.stdout, crashed.stderr[-3000:]
    resumed = train(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step 2" in resumed.stdout
    return workdir


def test_train_on_gcs_saves_crashes_and_resumes(gcs_run):
    root = epath.Path(gcs_run)
    assert sorted(p.name for p in root.iterdir()) >= ["checkpoints", "config.json", "eval.json", "metrics.jsonl",
                                                      "reward_curve.png"]
    assert not os.path.exists("gs:")  # nothing went to a local directory named like the URL
    assert runs.checkpoint_manager(gcs_run).all_steps() == [4, 5]  # keep=2
    assert set(json.loads((root / "eval.json").read_text())) >= {"pass_at_1_before_rl", "pass_at_1_after_rl"}
    assert (root / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    # The crashed run's lines (steps 0, 1, 2) survive the resumed run's appends (Cloud Storage objects
    # cannot be appended to), and step 2, computed by both runs, is bit-identical.
    sft = [m for m in lines if m["phase"] == "sft"]
    assert [m["step"] for m in sft] == [0, 1, 2, 2]
    assert sft[2]["sft_loss"] == sft[3]["sft_loss"]
    assert [m["step"] for m in lines if m["phase"] == "rl"] == [3, 4]
    assert runs.run_config(gcs_run).sft.steps == 3


def test_restore_onto_a_different_mesh(gcs_run):
    """Saved from one device; restored whole on one device and sharded on an 8-device mesh: equal."""
    single, step = runs.restore_model(gcs_run)
    assert step == 5
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, expert=2, tensor=2))
    sharded, _ = runs.restore_model(gcs_run, mesh=mesh)
    pairs = list(zip(nnx.to_flat_state(nnx.state(single)), nnx.to_flat_state(nnx.state(sharded))))
    assert len(pairs) > 10
    n_split = 0
    for (path, a), (_, b) in pairs:
        a, b = a.get_value(), b.get_value()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
        assert b.sharding.mesh.shape == mesh.shape
        n_split += any(s is not None for s in b.sharding.spec)
    assert n_split >= len(pairs) // 2  # experts, heads, embeddings... really sharded
    # the restored weights are the trained ones, not a fresh init
    fresh = dict(nnx.to_flat_state(nnx.state(runs.MiniMaxM1(single.cfg, rngs=nnx.Rngs(0)))))
    trained = dict(nnx.to_flat_state(nnx.state(single)))
    emb = next(p for p in trained if "embed" in str(p))
    assert not np.array_equal(np.asarray(fresh[emb].get_value()), np.asarray(trained[emb].get_value()))


def test_rollout_from_gcs_checkpoint(gcs_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "12+34="}) + "\n" + json.dumps({"prompt_ids": [1, 4, 5]}) + "\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, "rollout.py", f"--checkpoint={gcs_run}", "--tokenizer=arith", "--bos",
                          f"--prompts={prompts}", f"--output={out}", "--config.sampling.greedy=True",
                          "--config.sampling.max_new_tokens=4"],
                         capture_output=True, text=True, timeout=300, env={**ENV, **_gcs_env()})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restored step 5" in res.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[0]["prompt_ids"] == [1, 4, 5, 13, 6, 7, 14]
    # greedy rollout.py = greedy generate() on the restored model
    from m1jax.data import arith
    from m1jax.rollout import SamplingParams, generate

    model, _ = runs.restore_model(gcs_run)
    sp = SamplingParams(greedy=True, max_new_tokens=4, stop_token_ids=(arith.EOS,))
    r = jax.device_get(generate(model, [rows[0]["prompt_ids"]], sp))
    assert rows[0]["completion_ids"] == r.tokens[0, :r.lengths[0]].tolist()
    assert rows[0]["completion_text"] == arith.decode(rows[0]["completion_ids"])
    # prompts and output on gs:// too: the same file; --resume there keeps it whole
    remote_prompts, remote_out = f"gs://{BUCKET}/rollout/prompts.jsonl", f"gs://{BUCKET}/rollout/out.jsonl"
    storage.write_text(remote_prompts, prompts.read_text())
    for extra in ([], ["--resume"]):
        res = subprocess.run([sys.executable, "rollout.py", f"--checkpoint={gcs_run}", "--tokenizer=arith", "--bos",
                              f"--prompts={remote_prompts}", f"--output={remote_out}", "--config.sampling.greedy=True",
                              "--config.sampling.max_new_tokens=4", *extra],
                             capture_output=True, text=True, timeout=300, env={**ENV, **_gcs_env()})
        assert res.returncode == 0, res.stderr[-3000:]
        assert storage.read_text(remote_out) == out.read_text()
    assert "keeping 2 finished prompts (2 samples)" in res.stderr
    assert not os.path.exists("gs:")


def test_missing_bucket_or_checkpoint_is_a_clear_error(gcs, tmp_path):  # noqa: F811
    res = train("gs://no-such-bucket/run")
    assert res.returncode != 0
    assert "bucket gs://no-such-bucket of gs://no-such-bucket/run does not exist" in res.stderr
    with pytest.raises(storage.StorageError, match="not a train.py run directory"):
        runs.restore_model(f"gs://{BUCKET}/never-trained")
    storage.write_text(f"gs://{BUCKET}/no-ckpt/config.json", json.dumps({"model": {}}))
    with pytest.raises(storage.StorageError, match="no checkpoint in gs://m1jax-test/no-ckpt/checkpoints"):
        runs.checkpoint_manager(f"gs://{BUCKET}/no-ckpt")
    with pytest.raises(storage.StorageError, match="bucket gs://nope of gs://nope/run does not exist"):
        runs.restore_model("gs://nope/run")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    res = subprocess.run([sys.executable, "rollout.py", f"--prompts={prompts}", "--output=gs://nope/out.jsonl"],
                         capture_output=True, text=True, timeout=300, env={**ENV, **_gcs_env()})
    assert res.returncode != 0 and "bucket gs://nope of gs://nope/out.jsonl does not exist" in res.stderr


def test_save_model_replaces_a_step_and_restores_on_gcs(gcs):  # noqa: F811
    from m1jax.model import MiniMaxM1, ModelConfig

    cfg = ModelConfig(vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      layer_types=("linear_attention", "full_attention"), num_experts=2, num_experts_per_tok=1,
                      intermediate_size=32, rotary_dim=16, block_size=4)
    workdir = f"gs://{BUCKET}/saved-model"
    for seed in (1, 2):  # the second save of step 3 replaces the first
        model = MiniMaxM1(cfg, rngs=nnx.Rngs(seed))
        runs.save_model(workdir, model, step=3)
    back, step = runs.restore_model(workdir)
    assert step == 3
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
