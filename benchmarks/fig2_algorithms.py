"""Figure 2 in miniature: CISPO vs DAPO vs GRPO on the default job's task, same seeds and budget.

Each (algorithm, seed) is the default job (configs/arith_cispo.py) with ``rl.loss`` set to the
preset and a shortened RL phase; the SFT warm start is the same for the three algorithms of one
seed (same seed, same SFT config). Writes docs/fig2_algorithms.png (sampled reward per RL step,
mean over seeds, thin lines per seed) and prints held-out pass@1 before/after RL per run.

    python benchmarks/fig2_algorithms.py [--rl_steps=50] [--seeds=0,1] [--out=docs/fig2_algorithms.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ALGOS = ("cispo", "dapo", "grpo")


def run(algo: str, seed: int, rl_steps: int, workdir: str):
    t = time.perf_counter()
    cmd = [sys.executable, "train.py", "--config=configs/arith_cispo.py", f"--workdir={workdir}",
           f"--config.seed={seed}", f"--config.rl.loss={algo}", f"--config.rl.steps={rl_steps}"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    reward = [r["reward_mean"] for r in recs if "reward_mean" in r]
    ev = json.load(open(os.path.join(workdir, "eval.json")))
    return np.asarray(reward), ev, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rl_steps", type=int, default=50)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "fig2_algorithms.png"))
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    curves = {algo: [] for algo in ALGOS}
    print(f"{'algorithm':>9} | seed | pass@1 after SFT | after RL | gain (points) | mean reward, last 10 steps | wall")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for algo in ALGOS:
                reward, ev, wall = run(algo, seed, a.rl_steps, os.path.join(tmp, f"{algo}_{seed}"))
                curves[algo].append(reward)
                print(f"{algo:>9} | {seed:>4} | {ev['pass_at_1_before_rl']:>16.3f} | {ev['pass_at_1_after_rl']:>8.3f} | "
                      f"{ev['gain_points']:>13.1f} | {reward[-10:].mean():>26.3f} | {wall:.0f}s", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for algo, color in zip(ALGOS, ("C0", "C1", "C2")):
        runs = np.stack(curves[algo])
        for r in runs:
            ax.plot(r, color=color, alpha=0.25, lw=0.8)
        ax.plot(runs.mean(0), color=color, lw=2, label=f"{algo.upper()} (mean of {len(runs)} seeds)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean sampled reward (T=1)")
    ax.set_title("CISPO vs DAPO vs GRPO, tiny hybrid model, 2-digit addition")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
