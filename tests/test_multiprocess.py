"""2 processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train like 1 x 8: the
training step, and train.py and rollout.py launched as the same command on every process."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(out: str):
    line = [l for l in out.splitlines() if l.startswith("LOSSES ")][-1]
    return json.loads(line[len("LOSSES "):])


def test_two_processes_match_one():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    single = subprocess.run([sys.executable, WORKER, "1", "0", "8"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "2", str(i), "4", port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    ref = _losses(single.stdout)
    assert ref["devices"] == 8 and ref["processes"] == 1
    for o, _ in outs:
        got = _losses(o)
        assert got["processes"] == 2 and got["devices"] == 8
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains


def _two_processes(cmd, env, timeout=600):
    """Run ``cmd`` as 2 processes x 4 CPU devices joined by jax.distributed (the --coordinator flags)."""
    port = str(_free_port())
    env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([*cmd, f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "PYTHONFAULTHANDLER": "1"}) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:  # a hang: SIGABRT makes faulthandler print every thread's stack
        for p in procs:
            p.send_signal(signal.SIGABRT)
        stacks = [p.communicate()[1][-6000:] for p in procs]
        raise AssertionError("\n".join(f"process {i} hung; its stderr ends:\n{s}" for i, s in enumerate(stacks)))
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_train_py_on_two_processes_matches_one(tmp_path):
    """The same train.py command on 2 processes x 4 devices (one mesh over both) logs what 1 x 8 does;
    only process 0 writes the run's logs and reports."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    args = ["--config=configs/arith_cispo.py", "--config.sft.steps=2", "--config.rl.steps=2", "--config.log_every=1",
            "--config.checkpoint.every=2", "--config.data.eval_size=8", "--config.sft.batch_size=8",
            "--config.rl.prompts_per_step=4", "--config.rl.samples_per_prompt=4", "--config.rl.dynamic_sampling=False",
            "--config.mesh.data=2", "--config.mesh.expert=2", "--config.mesh.tensor=2"]
    one = subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path / 'one'}", *args], capture_output=True,
                         text=True, timeout=600, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr[-3000:]
    outs = _two_processes([sys.executable, "train.py", f"--workdir={tmp_path / 'two'}", *args], env)
    assert all("mesh data=2 expert=2 tensor=2: 8 of 8 devices" in out for out, _ in outs)
    assert "held-out pass@1" in outs[0][0] and "held-out pass@1" not in outs[1][0]  # process 1 stays quiet
    lines = {d: (tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("one", "two")}
    assert len(lines["two"]) == len(lines["one"])  # written once, not once per process
    for a, b in zip(map(json.loads, lines["one"]), map(json.loads, lines["two"])):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float) and k != "tokens_per_s":
                np.testing.assert_allclose(b[k], v, rtol=1e-6, err_msg=k)
            elif k != "tokens_per_s":
                assert b[k] == v, k
    assert json.loads((tmp_path / "two" / "eval.json").read_text()).keys() == json.loads(
        (tmp_path / "one" / "eval.json").read_text()).keys()


def test_rollout_py_on_two_processes_matches_one(tmp_path):
    """rollout.py as 2 processes x 4 devices writes the same JSONL as 1 x 8, once."""
    from tests.hf_utils import tiny_hf_model

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    tiny_hf_model().save_pretrained(tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in ([1, 2, 3], [4, 5], [], [6, 7, 8])) + "\n")
    args = ["rollout.py", "--config=configs/tiny.py", f"--checkpoint={tmp_path / 'ckpt'}", f"--prompts={prompts}",
            "--config.sampling.max_new_tokens=4", "--config.rollout.batch_size=2", "--config.rollout.num_samples=2",
            "--config.mesh.data=2", "--config.mesh.expert=4"]
    one = subprocess.run([sys.executable, *args, f"--output={tmp_path / 'one.jsonl'}"], capture_output=True, text=True,
                         timeout=600, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr[-3000:]
    _two_processes([sys.executable, *args, f"--output={tmp_path / 'two.jsonl'}"], env)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 1 + 3 * 2
