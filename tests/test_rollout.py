"""Rollout engine: cache correctness, greedy equivalences, transformers generate(), log-probs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m1jax.checkpoints import hf
from m1jax.model import MiniMaxM1, ModelConfig
from m1jax.rollout import SamplingParams, generate, left_pad, truncate
from m1jax.rollout.engine import LENGTH, REPETITION, STOP

LIN, FULL = "linear_attention", "full_attention"
CFG = ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=8,
    layer_types=(LIN, FULL, LIN, FULL, LIN), num_experts=4, intermediate_size=24, rotary_dim=4, block_size=3,
    initializer_range=0.3, linear_attn_alpha=1.4, mlp_alpha=1.4, full_attn_alpha=1.4,
)


@pytest.fixture(scope="module")
def model():
    return MiniMaxM1(CFG, rngs=nnx.Rngs(0))


PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [11, 12, 13, 14, 15, 16, 17], [40]]


def test_greedy_equals_argmax_of_full_forward(model):
    r = generate(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=10))
    assert (np.asarray(r.finish_reason) == LENGTH).all() and (np.asarray(r.lengths) == 10).all()
    fwd = jax.jit(lambda m, x: m(x))
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(jnp.argmax(fwd(model, jnp.asarray([seq]))[0, -1])))
        assert seq[len(prompt):] == np.asarray(r.tokens[i]).tolist(), i


def test_decode_after_prefill_equals_longer_prefill(model):
    """Logits of a prefill + token-by-token decode equal one forward over the whole sequence."""
    ids, mask = left_pad([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28]])
    full = np.asarray(model(jnp.asarray(ids[1:2, 4:])))  # the unpadded second row
    full0 = np.asarray(model(jnp.asarray(ids[:1])))
    p = 6  # prefill the first 6 columns, then decode the rest one at a time
    cache = model.init_cache(2, ids.shape[1])
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, :p]), cache, 0, jnp.asarray(mask[:, :p]),
                                             jnp.asarray(pos[:, :p]))
    outs = [np.asarray(logits)]
    step = jax.jit(lambda m, tok, c, i, ps: m.forward_with_cache(tok, c, i, None, ps))
    for j in range(p, ids.shape[1]):
        logits, cache = step(model, jnp.asarray(ids[:, j:j + 1]), cache, j, jnp.asarray(pos[:, j:j + 1]))
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got[0], full0[0], atol=1e-4)
    np.testing.assert_allclose(got[1, 4:], full[0], atol=1e-4)


def test_group_sampling_forks_the_prompt_cache(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    r = generate(model, PROMPTS[:2], params, num_samples=3)
    assert r.tokens.shape == (6, 6)
    toks = np.asarray(r.tokens)
    assert len({tuple(t) for t in toks[:3]}) > 1  # different samples of one prompt
    # each sample's first-token log-prob is that of the prompt's next-token distribution
    lp0 = jax.nn.log_softmax(model(jnp.asarray([PROMPTS[0]]))[0, -1])
    np.testing.assert_allclose(np.asarray(r.logprobs[:3, 0]), np.asarray(lp0[toks[:3, 0]]), atol=1e-5)


def test_sampler_logprobs_match_training_forward(model):
    """Pearson correlation of sampler vs trainer log-probs of the same tokens (fp32): >= 0.999."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=1)
    prompts = [[int(x) for x in np.random.default_rng(i).integers(1, 97, size=4 + i)] for i in range(6)]
    r = generate(model, prompts, params)
    samp, train = [], []
    for i, prompt in enumerate(prompts):
        n = int(r.lengths[i])
        seq = jnp.asarray([prompt + np.asarray(r.tokens[i, :n]).tolist()])
        logp = jax.nn.log_softmax(model(seq)[0])
        toks = seq[0, len(prompt):]
        train.append(np.asarray(logp[len(prompt) - 1:-1][jnp.arange(n), toks]))
        samp.append(np.asarray(r.logprobs[i, :n]))
    samp, train = np.concatenate(samp), np.concatenate(train)
    corr = np.corrcoef(samp, train)[0, 1]
    assert corr >= 0.999, corr
    # log p = z_y - logsumexp(z): two terms each within the 1e-4 logit tolerance of the decode test
    np.testing.assert_allclose(samp, train, atol=2e-4)


def test_bfloat16_kv_cache(model):
    """kv_dtype="bfloat16" stores the KV caches in bf16 and changes nothing else: a decode step on it
    equals one on an fp32 cache whose keys/values were rounded to bf16 (and differs from unrounded)."""
    from m1jax.rollout.engine import prefill

    ids, mask = left_pad(PROMPTS)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda m, tok, c, i, ps: m.forward_with_cache(tok, c, i, None, ps)[0])
    tok = jnp.asarray([[3], [4], [5], [6]])
    caches = {dt: prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), 4, ids.shape[1], dt)[1:3]
              for dt in (None, "bfloat16")}
    (c32, n_real), (c16, _) = caches[None], caches["bfloat16"]
    kv16 = [e for e in c16["blocks"] if "k" in e]
    assert kv16 and all(e["k"].dtype == e["v"].dtype == jnp.bfloat16 for e in kv16)
    rounded = dict(c32, blocks=[{k: v.astype(jnp.bfloat16).astype(jnp.float32) for k, v in e.items()} if "k" in e
                                else e for e in c32["blocks"]])
    got, want, unrounded = (np.asarray(step(model, tok, c, ids.shape[1], n_real[:, None])) for c in (c16, rounded, c32))
    np.testing.assert_allclose(got, want, atol=1e-5 * want.std())
    assert np.abs(got - unrounded).max() > 1e-3 * want.std()
    # The decode loop (on CPU compiled without XLA's float normalization, so that it writes bf16
    # columns in place): its greedy tokens and log-probs equal steps taken one at a time.
    r = generate(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=6), kv_dtype="bfloat16")
    assert (np.asarray(r.lengths) == 6).all()
    last, cache, n_real, _ = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), 6, ids.shape[1], "bfloat16")
    step_cache = jax.jit(lambda m, tok, c, i, ps: m.forward_with_cache(tok, c, i, None, ps))
    for i in range(6):
        logp = jax.nn.log_softmax(last)
        tok = jnp.argmax(last, axis=-1)
        np.testing.assert_array_equal(r.tokens[:, i], tok)
        np.testing.assert_allclose(r.logprobs[:, i], logp[jnp.arange(len(tok)), tok], atol=1e-5)
        logits, cache = step_cache(model, tok[:, None], cache, ids.shape[1] + i, (n_real + i)[:, None])
        last = logits[:, 0]


def test_decode_loop_writes_a_bfloat16_cache_in_place(model):
    """The compiled decode program has no cache-sized convert of a bf16 KV cache: a step writes its
    new column in place (XLA:CPU's float normalization computed the update in float32, rewriting
    the cache every step) and the attention reads the bf16 cache as is (no float32 copy)."""
    from m1jax.rollout.engine import decode, prefill

    ids, mask = left_pad(PROMPTS)
    graphdef, state = nnx.split(model)
    last, cache, n_real, _ = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), 6, ids.shape[1], "bfloat16")
    sp = SamplingParams(greedy=True, max_new_tokens=6)
    hlo = decode.lower(graphdef, state, cache, last, n_real, ids.shape[1], jax.random.key(0), sp, 1).compile().as_text()
    _, _, kv, max_len, d = cache["blocks"][1]["k"].shape
    cache_sized = re.compile(rf"= \w+\[[\d,]*{kv},{max_len},{d}\]\S* (bitcast-)?convert\(")
    converts = [line.strip()[:120] for line in hlo.splitlines() if cache_sized.search(line)]
    assert not converts, converts


@pytest.mark.parametrize("kv_dtype", [None, "bfloat16"])
def test_decode_attention_sums_values_over_column_blocks(model, kv_dtype):
    """The decode attention multiplies its weights and the values as a batch of dots over column
    blocks of the cache, summed after, with a float32 cache as with a bf16 one (XLA:CPU's one long
    dot over the cache was 3x slower)."""
    from m1jax.rollout.engine import decode, prefill

    ids, mask = left_pad(PROMPTS)
    new_tokens = 48 - ids.shape[1]  # cache length 48: column blocks of 16, three of them
    graphdef, state = nnx.split(model)
    last, cache, n_real, _ = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), new_tokens, ids.shape[1],
                                     kv_dtype)
    sp = SamplingParams(greedy=True, max_new_tokens=new_tokens)
    hlo = decode.lower(graphdef, state, cache, last, n_real, ids.shape[1], jax.random.key(0), sp, 1).compile().as_text()
    b, kv, g, d = len(PROMPTS), CFG.num_kv_heads, CFG.num_heads // CFG.num_kv_heads, CFG.head_dim
    rows = 3 * g if kv_dtype else g  # a bf16 cache multiplies three bf16 parts of each weight
    blocked = re.compile(rf"= f32\[{b},{kv},3,{rows},{d}\]\S* dot\(")
    assert any(blocked.search(line) for line in hlo.splitlines())


def test_top_p_top_k_truncation_and_truncated_logprobs():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(truncate(logits, 0, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, then 0.5 + 0.3 reaches it
    assert np.isfinite(np.asarray(truncate(logits, 1, 1.0))).tolist() == [[True, False, False, False]]
    from m1jax.rollout import sample

    s = sample(jnp.repeat(logits, 512, 0), jax.random.key(0), SamplingParams(top_p=0.7))
    assert set(np.asarray(s.token).tolist()) <= {0, 1}
    # full-vocabulary log-prob vs renormalized over the kept {0, 1}
    np.testing.assert_allclose(np.asarray(s.logprob), np.log([0.5, 0.3])[np.asarray(s.token)], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.logprob_truncated), np.log([0.625, 0.375])[np.asarray(s.token)], rtol=1e-5)


def _sorted_cumsum_keep(logits, top_k, top_p):
    """The textbook rule in float64 numpy: sort descending, keep the first top_k, and keep a token
    while the mass of the tokens before it is below top_p."""
    keep = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        order = np.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        keep[r, order[before < top_p]] = True
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.3), (0, 0.9), (0, 0.95), (7, 0.9), (7, 1.0), (1, 0.5)])
def test_truncation_equals_sorted_cumsum_rule(top_k, top_p):
    """The sort-free threshold search keeps exactly the tokens the sorted-cumsum rule keeps."""
    logits = np.random.default_rng(top_k).normal(size=(64, 300)).astype(np.float32) * np.linspace(0.5, 4, 64)[:, None]
    got = np.isfinite(np.asarray(jax.jit(truncate, static_argnums=(1, 2))(jnp.asarray(logits), top_k, top_p)))
    np.testing.assert_array_equal(got, _sorted_cumsum_keep(logits, top_k, top_p))
    # tied tokens are kept together (the sorted rule keeps one of the two 0.295s: 0.31 + 0.295 >= 0.5)
    tied = np.isfinite(np.asarray(truncate(jnp.log(jnp.asarray([[0.1, 0.295, 0.295, 0.31]])), 0, 0.5)))
    assert tied.tolist() == [[False, True, True, True]]


def test_stop_tokens_and_repetition_truncation(model):
    greedy = generate(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=10))
    stop = int(greedy.tokens[0, 3])
    r = generate(model, PROMPTS, SamplingParams(greedy=True, max_new_tokens=10, stop_token_ids=(stop,)))
    first = int(np.flatnonzero(np.asarray(greedy.tokens[0]) == stop)[0])
    assert int(r.finish_reason[0]) == STOP and int(r.lengths[0]) == first + 1
    assert (np.asarray(r.tokens[0, first + 1:]) == 0).all()
    # A peaked model (LM head x 50): every greedy token has probability > 0.99 -> repetition stop.
    peaked = MiniMaxM1(CFG, rngs=nnx.Rngs(0))
    peaked.lm_head.set_value(peaked.lm_head.get_value() * 50)
    r = generate(peaked, PROMPTS, SamplingParams(greedy=True, max_new_tokens=12, repetition_window=4,
                                                   repetition_prob=0.99))
    probs = np.exp(np.asarray(r.logprobs))
    for i in range(len(PROMPTS)):
        n = int(r.lengths[i])
        if int(r.finish_reason[i]) == REPETITION:
            assert (probs[i, n - 4:n] > 0.99).all()
    assert (np.asarray(r.finish_reason) == REPETITION).any()


def test_greedy_equals_transformers_generate(tmp_path):
    from tests.hf_utils import tiny_hf_model

    hf_model = tiny_hf_model()
    hf_model.save_pretrained(tmp_path)
    ours = hf.load(str(tmp_path))
    ids = np.random.default_rng(0).integers(0, 256, size=(3, 9))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.ones(3, 9, dtype=torch.long),
                                max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 9:].numpy()
    r = generate(ours, ids.tolist(), SamplingParams(greedy=True, max_new_tokens=12))
    np.testing.assert_array_equal(np.asarray(r.tokens), ref)


def test_chunked_prefill_equals_one_prefill(model):
    prompts = [list(range(1, 24)), list(range(30, 41))]
    one = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=6))
    chunked = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=6), prefill_chunk=5)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(chunked.tokens))
    np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(chunked.logprobs), atol=1e-4)


def test_prefill_chunks_read_the_cache_in_key_blocks():
    """Prefill chunks attend to the cache in key blocks of attention_chunk columns, stopping after
    the last filled one. Every chunk's logits equal one forward over each unpadded prompt."""
    m = MiniMaxM1(dataclasses.replace(CFG, attention_chunk=4), rngs=nnx.Rngs(0))
    ids, mask = left_pad([list(range(3, 26)), list(range(30, 41))])  # 23 and 11 tokens: 12 pads in row 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = m.init_cache(2, ids.shape[1])  # 23 columns
    outs = []
    # the last chunk reads 21 filled columns in blocks at 0, 4, ..., 16 and 19 (the last block overlaps
    # the one before: its column 19 must not count twice)
    for a, e in ((0, 9), (9, 21), (21, 23)):
        logits, cache = m.forward_with_cache(jnp.asarray(ids[:, a:e]), cache, a, jnp.asarray(mask[:, a:e]),
                                             jnp.asarray(pos[:, a:e]))
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got[0], np.asarray(m(jnp.asarray(ids[:1])))[0], atol=1e-4)
    np.testing.assert_allclose(got[1, 12:], np.asarray(m(jnp.asarray(ids[1:, 12:])))[0], atol=1e-4)


def test_routing_record_matches_a_full_forward(model):
    """Recorded top-k expert ids of prompt and completion tokens equal those of one forward pass."""
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    r = generate(model, prompts, SamplingParams(greedy=True, max_new_tokens=4), record_routing=True)
    assert r.routing.shape == (2, 4, CFG.num_layers, 2) and r.prompt_routing.shape == (2, 5, CFG.num_layers, 2)
    for i, prompt in enumerate(prompts):
        seq = prompt + np.asarray(r.tokens[i]).tolist()
        stats = model.forward(jnp.asarray([seq])).router_stats  # expert_ids: [L, T, k]
        ref = np.sort(np.asarray(stats.expert_ids), -1).transpose(1, 0, 2)  # [T, L, k]
        pad = 5 - len(prompt)
        np.testing.assert_array_equal(np.sort(np.asarray(r.prompt_routing[i, pad:]), -1), ref[: len(prompt)])
        # completion token j is routed when it is fed back in, as the input at position len(prompt) + j
        np.testing.assert_array_equal(np.sort(np.asarray(r.routing[i]), -1), ref[len(prompt):])
