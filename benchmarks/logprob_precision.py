"""Sampler (rollout) vs trainer (full forward) token probabilities of the same sampled tokens, by
precision: fp32 compute; bf16 compute with an fp32 LM head; bf16 compute with a bf16 LM head
(the paper's Figure 3 effect, in miniature). Prints the Pearson correlation of each and draws the
scatter plots (docs/fig3_logprob_precision.png).

    python benchmarks/logprob_precision.py [--out=docs/fig3_logprob_precision.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Some donated buffers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m1jax.configs import load_config_file, model_config  # noqa: E402
from m1jax.model import MiniMaxM1  # noqa: E402
from m1jax.rollout import SamplingParams, generate  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "fig3_logprob_precision.png"))
    args = parser.parse_args(argv)
    panels = []
    base = model_config(load_config_file("configs/tiny.py")).replace(initializer_range=0.06, param_dtype="bfloat16")
    ref = MiniMaxM1(base, rngs=nnx.Rngs(0))  # bf16 weights: the same numbers in every variant
    # A random model is near-uniform; a larger LM head gives the peaked distributions of a trained one.
    ref.lm_head.set_value((ref.lm_head.get_value().astype(jnp.float32) * 12).astype(jnp.bfloat16))
    prompts = [list(np.random.default_rng(i).integers(1, base.vocab_size, size=16)) for i in range(16)]
    print(f"tiny model, {len(prompts)} prompts x 64 sampled tokens, temperature 1")
    for name, kw in [("fp32 compute, fp32 head", dict(dtype="float32", lm_head_fp32=True)),
                     ("bf16 compute, fp32 head", dict(dtype="bfloat16", lm_head_fp32=True)),
                     ("bf16 compute, bf16 head", dict(dtype="bfloat16", lm_head_fp32=False))]:
        model = MiniMaxM1(base.replace(**kw), rngs=nnx.Rngs(0))
        nnx.update(model, nnx.state(ref))
        r = generate(model, [list(map(int, p)) for p in prompts], SamplingParams(max_new_tokens=64, seed=1))
        fwd = jax.jit(lambda m, x: jax.nn.log_softmax(m(x)))
        samp, train = [], []
        for i, p in enumerate(prompts):
            n = int(r.lengths[i])
            seq = np.concatenate([p, np.asarray(r.tokens[i, :n])])[None]
            lp = np.asarray(fwd(model, jnp.asarray(seq, jnp.int32))[0])
            train.append(np.exp(lp[len(p) - 1:-1][np.arange(n), seq[0, len(p):]]))
            samp.append(np.exp(np.asarray(r.logprobs[i, :n])))
        samp, train = np.concatenate(samp), np.concatenate(train)
        corr = np.corrcoef(samp, train)[0, 1]
        print(f"  {name}: Pearson(sampler p, trainer p) = {corr:.6f}; max |dp| = {np.abs(samp - train).max():.2e}; "
              f"mean p = {train.mean():.3f}")
        panels.append((name, train, samp, corr))
    plot(panels, args.out)


def plot(panels, out: str) -> None:
    """One scatter per variant: trainer probability (x) vs sampler probability (y) of each token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), sharey=True)
    for ax, (name, train, samp, corr) in zip(axes, panels):
        ax.scatter(train, samp, s=3, alpha=0.4, lw=0)
        ax.plot([0, 1], [0, 1], color="gray", lw=0.6)
        ax.set_title(f"{name}\nPearson {corr:.4f}", fontsize=9)
        ax.set_xlabel("training-mode probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("inference-mode (sampler) probability")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=150)
    print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
