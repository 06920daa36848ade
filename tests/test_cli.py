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


def test_dry_run_of_the_minimax_m1_rl_config(tmp_path):
    """train.py --dry_run on the paper's RL config for the 456B model: the config, data, tokenizer,
    mesh (8 devices: expert=8) and optimizers are checked, the abstract model's per-device memory is
    printed, and nothing is compiled or written; a mesh the experts do not split is one line."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": a + 1}) + "\n" for a in range(80)))
    argv = ["train.py", "--config=configs/minimax_m1_rl.py", f"--workdir={tmp_path / 'run'}", "--dry_run",
            f"--config.data.path={data}", "--config.data.tokenizer=chars:0123456789+="]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    res = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("dry run:")]
    assert len(line) == 1 and "456,089,655,296 parameters" in line[0], res.stdout[-2000:]
    assert "'expert': 8" in line[0] and "(512 rows x 90112 tokens per update)" in line[0], line[0]
    assert not (tmp_path / "run").exists()
    res = subprocess.run([sys.executable, *argv, "--config.mesh.expert=3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    one_line_error(res, "expert")
    assert not (tmp_path / "run").exists()
    # what the RL run would sample with: the model config's early truncation, the paper's T and top-p
    from m1jax import training
    from m1jax.configs import load_config_file

    config = load_config_file("configs/minimax_m1_rl.py")
    config.data.path, config.data.tokenizer = str(data), "chars:0123456789+="
    s = training.setup(config, str(tmp_path / "run"))  # 8 fake devices (tests/conftest.py)
    sp = s.sampling
    assert (sp.repetition_window, sp.repetition_prob, sp.temperature, sp.top_p) == (3000, 0.99, 1.0, 1.0)
    assert s.windows.window == 40 * 1024 and s.windows.overrides() == {"max_grad_norm": 1.0, "is_weight_max": 5.0}
