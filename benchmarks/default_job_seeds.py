"""The default job on five seeds: does RL raise held-out pass@1 on every one, within ten minutes?

Runs ``python train.py --config=configs/arith_cispo.py --config.seed=S`` for each seed, one after
another (each gets the whole machine), reads its eval.json and prints a table of held-out greedy
pass@1 after SFT and after RL, the gain in points and the wall time. The last line is

    default job seeds 0-4: min gain N.N points, max wall S s

    python benchmarks/default_job_seeds.py [--seeds=0,1,2,3,4] [--workdir=DIR] [extra train.py flags]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run_seed(seed: int, workdir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "train.py", "--config=configs/arith_cispo.py", f"--workdir={workdir}",
           f"--config.seed={seed}", *extra]
    t = time.perf_counter()
    with open(workdir + ".log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    ev = json.load(open(os.path.join(workdir, "eval.json")))
    ended = re.findall(r"SFT ended at step (\d+)", open(workdir + ".log").read())
    sft_steps = int(ended[-1]) if ended else -1
    before, after = ev["pass_at_1_before_rl"], ev["pass_at_1_after_rl"]
    return {"seed": seed, "sft_steps": sft_steps, "before": before, "after": after,
            "gain": 100 * (after - before), "wall_s": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a new temporary directory)")
    args, extra = p.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = args.workdir or tempfile.mkdtemp(prefix="m1jax-seeds-")
    os.makedirs(base, exist_ok=True)
    print(f"runs under {base}; extra flags: {extra or 'none'}", flush=True)
    print("| seed | SFT steps | pass@1 after SFT | pass@1 after RL | gain (points) | wall (s) |")
    print("|---|---|---|---|---|---|", flush=True)
    rows = []
    for s in seeds:
        r = run_seed(s, os.path.join(base, f"seed{s}"), extra)
        rows.append(r)
        print(f"| {s} | {r['sft_steps']} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.1f} | "
              f"{r['wall_s']:.0f} |", flush=True)
    label = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ",".join(map(str, seeds))
    print(f"default job seeds {label}: min gain {min(r['gain'] for r in rows):.1f} points, "
          f"max wall {max(r['wall_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
