"""Paper Figure 1 (right): theoretical inference FLOPs vs generation length, MiniMax-M1 vs DeepSeek-R1
and Qwen3-235B-A22B, and the ratios the paper quotes (M1 < 50% of DeepSeek-R1 at 64K tokens, ~25%
at 100K).

    python benchmarks/flops_figure.py            # prints the table, writes docs/fig1_flops.png

Per generated token at context length t (multiply-add = 2 FLOPs, batch 1, no prompt):

* linear layers: 2 x (parameters the token multiplies: attention projections, the routed
  experts it is sent to plus shared experts, routers, dense MLPs, LM head; no embedding lookup);
* softmax attention: 2·t·H·(d_qk + d_v) per layer (scores and the weighted sum over t keys);
* lightning attention (MiniMax-M1): the decode recurrence per head, S <- λS + kᵀv and o = qS:
  2·d² + 2·d² + d² (outer product, read-out, decay) -- independent of t.

"Generating L tokens" sums the per-token FLOPs over t = 1..L. The paper does not state its counting
convention; both the per-token cost at length L and the total for L tokens are printed.

DeepSeek-R1's multi-head latent attention can be computed two ways: "expanded" (per-head keys of
192 = 128 + 64 RoPE dims and values of 128, the training form) or "absorbed" (queries and outputs
multiplied into the 512-dim latent, attention over 576-dim keys and 512-dim values, the usual
decoding form: fewer bytes, more FLOPs). The figure uses the expanded form (the smaller count, the
conservative comparison for M1); the table prints both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m1jax.configs import load_config_file, model_config  # noqa: E402

K = 1024


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    linear_params: int  # parameters multiplied per token (active, excluding the embedding lookup)
    # softmax attention layers: (number of layers, query heads, qk dim per head, v dim per head)
    softmax: tuple[int, int, int, int]
    lightning: tuple[int, int, int] = (0, 0, 0)  # (layers, heads, head dim)
    source: str = ""

    def per_token(self, t: float) -> float:
        n, h, dqk, dv = self.softmax
        ln, lh, ld = self.lightning
        return 2 * self.linear_params + n * 2 * t * h * (dqk + dv) + ln * lh * 5 * ld * ld

    def total(self, length: int) -> float:
        """Sum of per_token(t) for t = 1..length (closed form: per_token is affine in t)."""
        return length * self.per_token(0) + (self.per_token(1) - self.per_token(0)) * length * (length + 1) / 2


def minimax_m1() -> Arch:
    """From configs/minimax_m1.py (the released config.json): 80 layers = 10 x (7 lightning + 1
    softmax), hidden 6144, 64 heads of 128, GQA 8 kv heads, 32 experts top-2 of width 9216,
    vocabulary 200,064."""
    cfg = model_config(load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "minimax_m1.py")))
    d, hd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    n_lin = sum(t == "linear_attention" for t in cfg.layer_types)
    n_full = cfg.num_layers - n_lin
    lightning = 3 * d * hd + d * hd + hd * d  # qkv, output gate, out
    softmax = d * hd + 2 * d * kvd + hd * d
    moe = cfg.num_experts_per_tok * 3 * d * cfg.intermediate_size + d * cfg.num_experts
    active = n_lin * lightning + n_full * softmax + cfg.num_layers * moe + d * cfg.vocab_size
    # The paper's 45.9B active parameters exclude the embedding and the LM head.
    assert abs((active - d * cfg.vocab_size) / 45.9e9 - 1) < 0.005, active
    return Arch("MiniMax-M1", active, (n_full, cfg.num_heads, cfg.head_dim, cfg.head_dim),
                (n_lin, cfg.num_heads, cfg.head_dim), "configs/minimax_m1.py")


def deepseek_r1(absorbed: bool = False) -> Arch:
    """DeepSeek-R1 = the DeepSeek-V3 architecture (huggingface.co/deepseek-ai/DeepSeek-R1 config.json;
    DeepSeek-V3 technical report, arXiv 2412.19437 §2): 61 layers, hidden 7168, the first 3 dense
    (MLP width 18432), 58 MoE with 256 routed experts top-8 + 1 shared, expert width 2048; MLA with
    128 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v_head 128; vocabulary
    129,280. 671B parameters, 37B active."""
    d, h, layers, dense, vocab = 7168, 128, 61, 3, 129280
    q_rank, kv_rank, nope, rope, dv = 1536, 512, 128, 64, 128
    mla = d * q_rank + q_rank * h * (nope + rope) + d * (kv_rank + rope) + kv_rank * h * (nope + dv) + h * dv * d
    moe = (8 + 1) * 3 * d * 2048 + d * 256
    active = layers * mla + dense * 3 * d * 18432 + (layers - dense) * moe + d * vocab
    assert abs((active + d * vocab) / 37e9 - 1) < 0.02, active  # the report's 37B counts the embedding
    if absorbed:
        return Arch("DeepSeek-R1 (MLA absorbed)", active, (layers, h, kv_rank + rope, kv_rank), source="")
    return Arch("DeepSeek-R1", active, (layers, h, nope + rope, dv), source="deepseek-ai/DeepSeek-R1 config.json")


def qwen3_235b() -> Arch:
    """Qwen3-235B-A22B (huggingface.co/Qwen/Qwen3-235B-A22B config.json; Qwen3 technical report,
    arXiv 2505.09388 Table 2): 94 layers, hidden 4096, GQA 64 query / 4 kv heads of 128, 128 experts
    top-8 of width 1536 (no shared expert), vocabulary 151,936. 235B parameters, 22B active."""
    d, layers, h, kv, hd, vocab = 4096, 94, 64, 4, 128, 151936
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    moe = 8 * 3 * d * 1536 + d * 128
    active = layers * (attn + moe) + d * vocab
    assert abs((active + d * vocab) / 22e9 - 1) < 0.02, active  # 22B with the (untied) embedding
    return Arch("Qwen3-235B-A22B", active, (layers, h, hd, hd), source="Qwen/Qwen3-235B-A22B config.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "fig1_flops.png"))
    args = parser.parse_args(argv)
    m1, ds, ds_abs, qw = minimax_m1(), deepseek_r1(), deepseek_r1(absorbed=True), qwen3_235b()
    print("active linear parameters per token (excl. embedding lookup): "
          + ", ".join(f"{a.name} {a.linear_params / 1e9:.1f}B" for a in (m1, ds, qw)))
    print("\n| generation length | measure | M1 / DeepSeek-R1 | M1 / DeepSeek-R1 (MLA absorbed) | M1 / Qwen3-235B "
          "| paper (M1 / DeepSeek-R1) |\n|---|---|---|---|---|---|")
    paper = {64 * K: "< 50%", 100 * K: "~25%"}
    for length in (32 * K, 64 * K, 100 * K, 128 * K):
        for measure, f in (("total for L tokens", lambda a: a.total(length)),
                           ("per token at L", lambda a: a.per_token(length))):
            print(f"| {length // K}K | {measure} | {f(m1) / f(ds):.1%} | {f(m1) / f(ds_abs):.1%} | "
                  f"{f(m1) / f(qw):.1%} | {paper.get(length, '')} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.linspace(1 * K, 128 * K, 128)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (ylabel, f, scale) in zip(axes, (
            ("FLOPs to generate L tokens (PFLOPs)", lambda a, n: a.total(int(n)), 1e15),
            ("FLOPs of the token at length L (GFLOPs)", lambda a, n: a.per_token(n), 1e9))):
        for arch in (ds, qw, m1):
            ax.plot(lengths / K, [f(arch, n) / scale for n in lengths], label=arch.name, lw=2)
        for x in (64, 100):
            ax.axvline(x, color="gray", lw=0.5)
        ax.set_xlabel("generation length L (K tokens)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle("Theoretical inference FLOPs, batch 1 (MLA expanded; see benchmarks/flops_figure.py)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"\nwrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
