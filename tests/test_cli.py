"""The entry points' command lines: a user's mistake is one line naming the problem and the fix, exit
code 2, no traceback, nothing written; --print_config prints the resolved config."""

import json
import os
import subprocess
import sys

import pytest

from m1jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def entry(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def one_line_error(res, *needles):
    assert res.returncode == cli.USAGE_ERROR, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if ": error: " in line or line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_nearest_key_prefers_the_same_section():
    keys = ["rl.steps", "rl.tis_cap", "sft.steps", "model.hidden_size", "seed"]
    assert cli.nearest("rl.stepz", keys) == "rl.steps"
    assert cli.nearest("rlx.steps", keys) == "rl.steps"
    assert cli.nearest("model.hiden_size", keys) == "model.hidden_size"
    assert cli.nearest("rl.zzzzzzzz", keys) is None


@pytest.mark.parametrize("argv, needles", [
    (["--config.rl.stepz=3"], ["--config.rl.stepz", "did you mean --config.rl.steps?"]),
    (["--config.rl.steps=abc"], ["--config.rl.steps=abc", "int"]),
    (["--config=configs/nope.py"], ["configs/nope.py", "no such config file"]),
    (["--config.mesh.data=3"], ["needs 3 devices but 1 are available"]),
    (["--config.rl.loss=foo"], ["rl.loss='foo'", "cispo"]),
])
def test_train_py_mistakes(tmp_path, argv, needles):
    workdir = tmp_path / "run"
    one_line_error(entry("train.py", f"--workdir={workdir}", *argv), *needles)
    assert not workdir.exists()  # nothing written


def test_rollout_py_mistakes(tmp_path):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    ok = [f"--prompts={prompts}", f"--output={out}"]
    one_line_error(entry("rollout.py", f"--prompts={tmp_path / 'nope.jsonl'}", f"--output={out}"), "nope.jsonl",
                   "no such file")
    one_line_error(entry("rollout.py", *ok, f"--checkpoint={tmp_path / 'nockpt'}"), "nockpt", "no such directory")
    one_line_error(entry("rollout.py", *ok, "--config.rollout.slotz=3"), "did you mean --config.rollout.slots?")
    one_line_error(entry("rollout.py", f"--prompts={prompts}"), "--output is required")
    assert not out.exists()


def test_plan_mistake_names_the_nearest_model_field():
    one_line_error(entry("-m", "m1jax.plan", "--topology=v5p-8", "--model.hiden_size=64"),
                   "did you mean --model.hidden_size?")


def test_print_config_prints_the_resolved_config(tmp_path):
    res = entry("train.py", f"--workdir={tmp_path / 'run'}", "--config.rl.steps=7", "--print_config")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "  steps: 7\n" in res.stdout and "sft_optim:" in res.stdout
    assert not (tmp_path / "run").exists()
    res = entry("rollout.py", "--config.sampling.top_p=0.5", "--print_config")
    assert res.returncode == 0 and "top_p: 0.5" in res.stdout, res.stderr[-2000:]
    res = entry("-m", "m1jax.plan", "--topology=v5p-8", "--config=configs/tiny.py", "--print_config")
    assert res.returncode == 0 and "layer_types" in res.stdout, res.stderr[-2000:]
