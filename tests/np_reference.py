"""Float64 numpy re-derivation of MiniMax-M1 written from the spec, independent of m1jax's code:
token-by-token lightning recurrence, per-token expert loops, RoPE as complex rotation."""

from __future__ import annotations

import numpy as np


def lightning_recurrence(q, k, v, sigma, state=None):
    """q, k, v: [B, T, H, d] float64; sigma [H]. S_t = lam S_{t-1} + k_t^T v_t; o_t = q_t S_t."""
    b, t, h, d = q.shape
    s = np.zeros((b, h, d, v.shape[-1])) if state is None else np.array(state, np.float64)
    lam = np.exp(-np.asarray(sigma, np.float64))[None, :, None, None]
    out = np.zeros((b, t, h, v.shape[-1]))
    for i in range(t):
        s = lam * s + np.einsum("bhd,bhe->bhde", k[:, i], v[:, i])
        out[:, i] = np.einsum("bhd,bhde->bhe", q[:, i], s)
    return out, s


def rope(x, positions, rotary_dim, theta):
    """Channel pairs (i, i + r/2), i < r/2, rotated by angle p * theta^(-2i/r) as complex numbers."""
    half = rotary_dim // 2
    inv = theta ** (-2.0 * np.arange(half) / rotary_dim)
    z = x[..., :half] + 1j * x[..., half:rotary_dim]
    z = z * np.exp(1j * positions[:, :, None, None] * inv)
    return np.concatenate([z.real, z.imag, x[..., rotary_dim:]], axis=-1)


def rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1 + np.exp(-x))


def forward(cfg, layers, embed, final_norm, lm_head, ids):
    """layers: list (global order) of dicts of float64 arrays in m1jax layout ([in, out])."""
    x = embed[ids].astype(np.float64)
    b, t = ids.shape
    pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.float64)
    sig = cfg.decay_rates()
    h, d, kvh = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
    for l, p in enumerate(layers):
        a = rms(x, p["input_norm"], cfg.rms_norm_eps)
        if cfg.layer_types[l] == "linear_attention":
            u = silu(a @ p["qkv"]).reshape(b, t, h, 3 * d)
            o, _ = lightning_recurrence(u[..., :d], u[..., d:2 * d], u[..., 2 * d:], sig[l])
            y = rms(o.reshape(b, t, h * d), p["norm"], cfg.lightning_norm_eps)
            m = (1 / (1 + np.exp(-(a @ p["gate"]))) * y) @ p["out"]
            alpha, beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            q = rope((a @ p["q"]).reshape(b, t, h, d), pos, cfg.rotary_dim, cfg.rope_theta)
            k = rope((a @ p["k"]).reshape(b, t, kvh, d), pos, cfg.rotary_dim, cfg.rope_theta)
            v = (a @ p["v"]).reshape(b, t, kvh, d)
            o = np.zeros((b, t, h, d))
            for head in range(h):
                g = head // (h // kvh)
                s = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, g]) / np.sqrt(d)
                s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                o[:, :, head] = np.einsum("bts,bsd->btd", s / s.sum(-1, keepdims=True), v[:, :, g])
            m = o.reshape(b, t, h * d) @ p["o"]
            alpha, beta = cfg.full_attn_alpha, cfg.full_attn_beta
        x1 = alpha * (a if cfg.postnorm else x) + beta * m
        bb = rms(x1, p["post_norm"], cfg.rms_norm_eps)
        z = bb @ p["router"]
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.zeros_like(bb)
        for i in range(b):
            for j in range(t):
                top = np.argsort(-probs[i, j], kind="stable")[: cfg.num_experts_per_tok]
                w = probs[i, j, top] / probs[i, j, top].sum()
                for e, we in zip(top, w):
                    hdn = silu(bb[i, j] @ p["w1"][e]) * (bb[i, j] @ p["w3"][e])
                    y[i, j] += we * (hdn @ p["w2"][e])
        x = cfg.mlp_alpha * (bb if cfg.postnorm else x1) + cfg.mlp_beta * y
    return rms(x, final_norm, cfg.rms_norm_eps) @ lm_head


def params_from_model(model):
    """Per-layer float64 dicts in global layer order, plus the global tensors, from a MiniMaxM1."""
    from flax import nnx

    from m1jax.model import layer_index

    cfg = model.cfg
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    layers = []
    for l in range(cfg.num_layers):
        group, rep, slot = layer_index(cfg, l)
        lp = state[group]["layers"][slot]
        flat = {
            "input_norm": lp["input_norm"]["weight"], "post_norm": lp["post_norm"]["weight"],
            **{k: v for k, v in lp["mixer"].items()}, **lp["moe"],
        }
        layers.append({k: f64(v[rep]) for k, v in flat.items()})
    return layers, f64(state["embed"]), f64(state["final_norm"]["weight"]), f64(state["lm_head"])
