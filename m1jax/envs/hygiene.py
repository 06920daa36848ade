"""Data hygiene (MiniMax-M1 §4.1) on JSONL prompt files: decontamination and pass-rate filtering.

* ``dedup``: drop training prompts that equal an eval prompt after normalization (lowercase,
  whitespace collapsed, punctuation removed) or share at least ``min_shared`` word n-grams
  (n = ``ngram``) with one; duplicates within the training file are dropped too (first kept).
* ``filter_pass_rate``: keep prompts whose pass rate (the share of k sampled completions the
  verifier accepts, measured with the current policy) lies strictly between two bounds: too easy
  and too hard prompts carry no learning signal under group-relative advantages.

CLI::

    python -m m1jax.envs.hygiene dedup --train=train.jsonl --eval=eval.jsonl --out=clean.jsonl [--ngram=13]
    python -m m1jax.envs.hygiene passrate --input=scored.jsonl --out=kept.jsonl --low=0 --high=1

``passrate`` reads a ``pass_rate`` field (or ``passes`` and ``attempts``) on each line. Both print
how many lines they kept and why the others went.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Iterable

from m1jax.storage import read_jsonl

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def dedup(train: Iterable[dict], eval_rows: Iterable[dict], key: str = "prompt", ngram: int = 13,
          min_shared: int = 1) -> tuple[list[dict], dict[str, int]]:
    """(kept rows, counts of {"kept", "exact_eval", "ngram_eval", "duplicate"})."""
    eval_exact, eval_grams = set(), set()
    for row in eval_rows:
        eval_exact.add(normalize(row[key]))
        eval_grams |= ngrams(row[key], ngram)
    kept, seen = [], set()
    counts = {"kept": 0, "exact_eval": 0, "ngram_eval": 0, "duplicate": 0}
    for row in train:
        norm = normalize(row[key])
        if norm in eval_exact:
            counts["exact_eval"] += 1
        elif len(ngrams(row[key], ngram) & eval_grams) >= min_shared:
            counts["ngram_eval"] += 1
        elif norm in seen:
            counts["duplicate"] += 1
        else:
            seen.add(norm)
            kept.append(row)
            counts["kept"] += 1
    return kept, counts


def pass_rate(row: dict) -> float:
    if "pass_rate" in row:
        return float(row["pass_rate"])
    if "passes" in row and "attempts" in row and row["attempts"] > 0:
        return row["passes"] / row["attempts"]
    raise ValueError(f"line needs 'pass_rate' or 'passes' and 'attempts' (> 0): {json.dumps(row)[:200]}")


def filter_pass_rate(rows: Iterable[dict], low: float = 0.0, high: float = 1.0) -> tuple[list[dict], dict[str, int]]:
    """Rows with low < pass rate < high; counts of {"kept", "too_hard", "too_easy"}."""
    if not 0 <= low < high <= 1:
        raise ValueError(f"pass-rate bounds low={low}, high={high}: need 0 <= low < high <= 1.")
    kept, counts = [], {"kept": 0, "too_hard": 0, "too_easy": 0}
    for row in rows:
        p = pass_rate(row)
        if p <= low:
            counts["too_hard"] += 1
        elif p >= high:
            counts["too_easy"] += 1
        else:
            kept.append(row)
            counts["kept"] += 1
    return kept, counts


def write_jsonl(path: str, rows: list[dict]):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m1jax.envs.hygiene", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dedup", help="drop training prompts that overlap the eval set (exact or n-gram)")
    d.add_argument("--train", required=True)
    d.add_argument("--eval", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--key", default="prompt")
    d.add_argument("--ngram", type=int, default=13)
    d.add_argument("--min_shared", type=int, default=1)
    p = sub.add_parser("passrate", help="keep prompts whose pass rate lies strictly between --low and --high")
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--low", type=float, default=0.0)
    p.add_argument("--high", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "dedup":
        train = read_jsonl(a.train)
        missing = [i for i, r in enumerate(train) if a.key not in r]
        if missing:
            raise SystemExit(f"{a.train}: lines {missing[:5]} have no {a.key!r} field (choose it with --key).")
        kept, counts = dedup(train, read_jsonl(a.eval), a.key, a.ngram, a.min_shared)
    else:
        kept, counts = filter_pass_rate(read_jsonl(a.input), a.low, a.high)
    write_jsonl(a.out, kept)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
