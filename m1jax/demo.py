"""Build a model from a config, run a forward pass and round-trip it through the transformers format.

    python -m m1jax.demo --config=configs/tiny.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.checkpoints import hf
from m1jax.configs import load_config_file, model_config
from m1jax.model import MiniMaxM1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    cfg = model_config(load_config_file(args.config))
    print(f"config {args.config}: {cfg.num_layers} layers {cfg.pattern[0]} x {cfg.pattern[1]}, "
          f"{cfg.param_count():,} parameters")
    model = MiniMaxM1(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, args.seq)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m.forward(x))
    t = time.perf_counter()
    out = jax.block_until_ready(fwd(model, ids))
    print(f"forward [2, {args.seq}] -> logits {out.logits.shape} in {time.perf_counter() - t:.2f}s "
          f"(incl. compile); aux loss {float(out.aux_loss):.4f}")
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, d)
        back = hf.load(d)
        err = float(jnp.abs(fwd(back, ids).logits - out.logits).max())
    print(f"transformers-format round trip: max |delta logit| = {err:.2e}")


if __name__ == "__main__":
    main()
