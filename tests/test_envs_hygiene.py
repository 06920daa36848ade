"""Data hygiene: exact and n-gram decontamination against an eval set, pass-rate filtering, the CLI."""

import json
import subprocess
import sys

import pytest

from m1jax.envs.hygiene import dedup, filter_pass_rate

EVAL = [{"prompt": "What is the sum of the first ten positive odd integers?"}]
TRAIN = [
    {"prompt": "what is the SUM of the first ten positive odd integers"},  # exact after normalization
    {"prompt": "Tell me: the sum of the first ten positive odd numbers, please."},  # shares a 5-gram
    {"prompt": "Compute 17 * 23."},
    {"prompt": "compute 17 * 23"},  # duplicate of the previous one (normalized; '*' is punctuation)
    {"prompt": "Name the largest prime below 100."},
]


def test_dedup_exact_ngram_and_internal_duplicates():
    kept, counts = dedup(TRAIN, EVAL, ngram=5)
    assert [r["prompt"] for r in kept] == ["Compute 17 * 23.", "Name the largest prime below 100."]
    assert counts == {"kept": 2, "exact_eval": 1, "ngram_eval": 1, "duplicate": 1}
    kept, counts = dedup(TRAIN, EVAL, ngram=13)  # no 13-word overlap: only the exact copy goes
    assert counts["exact_eval"] == 1 and counts["ngram_eval"] == 0 and len(kept) == 3


def test_pass_rate_bounds_are_strict():
    rows = [{"id": i, "pass_rate": p} for i, p in enumerate((0.0, 0.125, 0.5, 1.0))] + [
        {"id": 4, "passes": 3, "attempts": 4}]
    kept, counts = filter_pass_rate(rows, 0.0, 1.0)
    assert [r["id"] for r in kept] == [1, 2, 4] and counts == {"kept": 3, "too_hard": 1, "too_easy": 1}
    kept, _ = filter_pass_rate(rows, 0.125, 0.75)
    assert [r["id"] for r in kept] == [2]
    with pytest.raises(ValueError, match="low < high"):
        filter_pass_rate(rows, 0.5, 0.5)
    with pytest.raises(ValueError, match="pass_rate"):
        filter_pass_rate([{"prompt": "x"}])


def test_cli(tmp_path):
    for name, rows in (("train", TRAIN), ("eval", EVAL)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.jsonl"
    res = subprocess.run([sys.executable, "-m", "m1jax.envs.hygiene", "dedup", f"--train={tmp_path / 'train.jsonl'}",
                          f"--eval={tmp_path / 'eval.jsonl'}", f"--out={out}", "--ngram=5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kept"] == 2 and len(out.read_text().splitlines()) == 2
