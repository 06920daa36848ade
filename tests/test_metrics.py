"""Metrics: TensorBoard event files read back by TensorBoard itself, JSONL lines, the progress bar."""

import io
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c

from m1jax.metrics import EventFileWriter, MetricsWriter, ProgressBar, crc32c, event_file_name, masked_crc32c


def read_scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def writer(workdir, resume_step=None):
    os.makedirs(workdir / "tb", exist_ok=True)
    events = EventFileWriter(open(workdir / "tb" / event_file_name(), "ab"), resume_step)
    return MetricsWriter(open(workdir / "metrics.jsonl", "a"), events)


def test_crc32c_known_answer_and_tensorboards_masking():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == tb_masked_crc32c(data)


def test_scalars_read_back_by_tensorboard_equal_the_jsonl(tmp_path):
    w = writer(tmp_path)
    records = [{"step": s, "phase": "rl", "reward_mean": 0.1 * s, "groups_kept": np.int64(s), "finite": True,
                "loss": np.float32(1.0 / (s + 1)), "note": "text is skipped"} for s in range(5)]
    records.append({"step": 5, "phase": "eval", "pass_at_1": 0.75, "gain": None})
    for r in records:
        w.write(r)
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 1, "phase": "rl", "reward_mean": 0.1, "groups_kept": 1, "finite": True,
                        "loss": float(np.float32(0.5)), "note": "text is skipped"}
    tb = read_scalars(tmp_path / "tb")
    expected = {}
    for rec in lines:
        for k, v in rec.items():
            if k not in ("step", "phase") and isinstance(v, (int, float)):
                expected.setdefault(f"{rec['phase']}/{k}", []).append((rec["step"], float(np.float32(v))))
    assert tb == expected
    assert set(tb) == {"rl/reward_mean", "rl/groups_kept", "rl/finite", "rl/loss", "eval/pass_at_1"}


def test_resumed_run_replaces_the_crashed_runs_later_steps(tmp_path):
    first = writer(tmp_path)
    for s in range(6):
        first.write({"step": s, "phase": "rl", "loss": float(s)})
    first.close()  # "crashed" after step 5; the last checkpoint was at step 3
    second = writer(tmp_path, resume_step=3)
    for s in range(3, 8):
        second.write({"step": s, "phase": "rl", "loss": 100.0 + s})
    second.close()
    assert len(os.listdir(tmp_path / "tb")) == 2
    assert read_scalars(tmp_path / "tb")["rl/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0)] + [(s, 100.0 + s) for s in range(3, 8)]


def test_negative_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="step must be >= 0"):
        writer(tmp_path).write({"step": -1, "phase": "rl", "loss": 1.0})


def test_progress_bar_in_a_log_file_prints_every_n_steps():
    out = io.StringIO()
    bar = ProgressBar(total=10, start=2, every=4, stream=out)
    for done in range(3, 11):
        bar.update(done, f"step {done}")
    lines = out.getvalue().splitlines()
    assert [line.split("| ")[1] for line in lines] == ["step 4", "step 8", "step 10"]  # every 4th, and the last
    assert lines[-1].startswith("[" + "#" * 24 + "] 100% 10/10")
