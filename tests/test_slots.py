"""The slot engine (continuous batching): equal to static batching sample by sample, correct
against the static engine and the training forward, slots reused clean, bad prompts isolated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import sharding as shd
from m1jax.model import MiniMaxM1
from m1jax.rollout import SamplingParams, generate, generate_slots
from m1jax.rollout import slots as slots_mod
from m1jax.rollout.engine import ERROR, LENGTH, STOP
from tests.test_rollout import CFG

# Mixed widths (buckets 16 and 32), so prefills and inserts of two buckets share the slots.
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], list(range(20, 38)), [40], [11, 12, 13, 14, 15, 16, 17]]
LIMITS = np.array([[9, 2, 14], [3, 12, 1], [6, 6, 13], [14, 4, 2], [1, 10, 5]])  # per sample, <= 14
FIELDS = ("tokens", "logprobs", "logprobs_truncated", "lengths", "finish_reason")
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=14, stop_token_ids=(35, 6), seed=7)
GREEDY = SamplingParams(greedy=True, max_new_tokens=14)


@pytest.fixture(scope="module")
def model():
    return MiniMaxM1(CFG, rngs=nnx.Rngs(0))


def _run(model, params, prompts=PROMPTS, limits=LIMITS, **kw):
    kw = dict(slots=4, prompt_width=32, segment=8, refill=1, **kw)
    return generate_slots(model, prompts, params, 3, max_new_tokens=limits, **kw)


def _equal(a, b, rows=None):
    for f in FIELDS:
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        np.testing.assert_array_equal(x if rows is None else x[rows], y, err_msg=f)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "top_p"])
def test_continuous_equals_static_sample_by_sample(model, params):
    cont, static = _run(model, params), _run(model, params, continuous=False)
    _equal(cont.rollout, static.rollout)
    lengths = np.asarray(cont.rollout.lengths)
    assert cont.busy_steps == static.busy_steps == lengths.sum() and cont.slot_steps < static.slot_steps
    # ... and in any order: prompt i's samples fold its index into their keys, whatever slot they get
    order = [3, 0, 4, 2, 1]
    moved = _run(model, params, [PROMPTS[i] for i in order], LIMITS[order], prompt_index=order)
    rows = np.concatenate([np.arange(3 * i, 3 * i + 3) for i in order])
    _equal(cont.rollout, moved.rollout, rows)
    lengths = lengths.reshape(LIMITS.shape)
    stopped = np.asarray(cont.rollout.finish_reason).reshape(LIMITS.shape) == STOP
    assert (lengths[~stopped] == LIMITS[~stopped]).all() and (lengths <= LIMITS).all()
    if not params.greedy:
        assert stopped.any(), "no sample met the stop token: the test covers less than it should"


def test_greedy_equals_the_static_engine_and_logprobs_the_training_forward(model):
    """Independent references: ``generate`` (one batch, left-padded, itself tested against argmax
    of full forwards) gives the same greedy tokens; the sampler log-probs at T=1 equal the
    training forward's log-softmax on prompt + completion."""
    r = _run(model, GREEDY).rollout
    ref = generate(model, PROMPTS, GREEDY, num_samples=3)
    tokens, ref_tokens = np.asarray(r.tokens), np.asarray(ref.tokens)
    for row, n in enumerate(np.asarray(r.lengths)):
        assert n == LIMITS.reshape(-1)[row] and r.finish_reason[row] == LENGTH
        np.testing.assert_array_equal(tokens[row, :n], ref_tokens[row, :n])
    s = _run(model, SAMPLED).rollout
    fwd = jax.jit(lambda m, x: jax.nn.log_softmax(m(x)[0], axis=-1))
    for row in (0, 7, 11):
        p, n = PROMPTS[row // 3], int(s.lengths[row])
        seq = jnp.asarray([p + np.asarray(s.tokens[row, :n]).tolist()])
        lp = np.asarray(fwd(model, seq))[len(p) - 1:-1][np.arange(n), np.asarray(s.tokens[row, :n])]
        np.testing.assert_allclose(np.asarray(s.logprobs[row, :n]), lp, rtol=1e-5, atol=1e-5)


def test_a_reused_slot_starts_clean(model, monkeypatch):
    """One slot: a long sample, then a short one in the same slot, equals the short one alone.
    Mutations that skip the reset of the lightning states or of the key mask (the previous
    sample's KV columns stay visible) must break the equality."""
    long, short = list(range(30, 48)), [7, 8]
    kw = dict(prompt_index=[1], slots=1, prompt_width=32, key=jax.random.key(3))
    alone = generate_slots(model, [short], SAMPLED, 1, max_new_tokens=[6], **kw).rollout
    both = generate_slots(model, [long, short], SAMPLED, 1, max_new_tokens=[14, 6], **{**kw, "prompt_index": [0, 1]})
    _equal(both.rollout, alone, [1])
    fresh = slots_mod._fresh_entry
    for skipped in ("state", "key_valid"):
        monkeypatch.setattr(slots_mod, "_fresh_entry",
                            lambda name, big, *a, skip=skipped: big if name == skip else fresh(name, big, *a))
        slots_mod._insert.clear_cache()
        bad = generate_slots(model, [long, short], SAMPLED, 1, max_new_tokens=[14, 6],
                             **{**kw, "prompt_index": [0, 1]}).rollout
        assert not np.array_equal(np.asarray(bad.logprobs)[1], np.asarray(alone.logprobs)[0]), skipped
    monkeypatch.undo()
    slots_mod._insert.clear_cache()


def test_a_bad_prompt_fails_only_its_own_samples(model):
    bad = [[], [5, 500], list(range(1, 40)), [9, 9]]  # empty, id outside the vocab, too long, bad limit
    prompts = [PROMPTS[0], *bad[:3], PROMPTS[1], bad[3]]
    limits = [[9, 2, 14], [1] * 3, [1] * 3, [1] * 3, [3, 12, 1], [0, 1, 1]]
    r = _run(model, SAMPLED, prompts, limits)
    assert sorted(r.errors) == [1, 2, 3, 5]
    assert "empty" in r.errors[1] and "vocabulary" in r.errors[2] and "prompt width" in r.errors[3]
    assert "max_new_tokens" in r.errors[5]
    assert (np.asarray(r.rollout.finish_reason).reshape(6, 3)[[1, 2, 3, 5]] == ERROR).all()
    good = _run(model, SAMPLED, [PROMPTS[0], PROMPTS[1]], LIMITS[:2], prompt_index=[0, 4])
    _equal(r.rollout, good.rollout, np.r_[0:3, 12:15])


def test_continuous_equals_static_on_the_mesh(model):
    """8 devices (data 2 x expert 2 x tensor 2; the experts expert-parallel): the same samples in
    both modes, and the single device's greedy tokens."""
    mesh = shd.make_mesh(shd.MeshConfig(data=2, expert=2, tensor=2))
    sharded = shd.create_sharded(lambda: MiniMaxM1(CFG, rngs=nnx.Rngs(0)), mesh)
    nnx.update(sharded, jax.device_put(nnx.state(model), shd.state_shardings(nnx.state(sharded), mesh)))
    with jax.set_mesh(mesh):
        cont, static = _run(sharded, SAMPLED), _run(sharded, SAMPLED, continuous=False)
        greedy = _run(sharded, GREEDY).rollout
    _equal(cont.rollout, static.rollout)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(_run(model, GREEDY).rollout.tokens))


def test_a_sampling_call_hashes_the_model_structure_once_per_split(model, monkeypatch):
    """jit hashes its static arguments on every call, and an nnx GraphDef hashes by walking the
    whole model: the engine hands its programs the graphdef and treedef interned and hashed once
    (engine._Static), so a sampling call's hundreds of prefills, inserts and segments never walk
    the model again; the cached split goes away with its State (no parameters are kept alive)."""
    import gc

    from m1jax.rollout import engine

    _run(model, GREEDY)  # compiled
    graphdef_type = type(nnx.split(model)[0])
    calls = []
    real_hash, real_eq = graphdef_type.__hash__, graphdef_type.__eq__
    monkeypatch.setattr(graphdef_type, "__hash__", lambda self: calls.append("hash") or real_hash(self))
    monkeypatch.setattr(graphdef_type, "__eq__", lambda self, o: calls.append("eq") or real_eq(self, o))
    run = _run(model, GREEDY)
    assert run.segments > 3 and len(PROMPTS) > 3  # many programs ran ...
    assert len(calls) <= 2, calls  # ... and the model's structure was hashed / compared once (a new split)
    monkeypatch.undo()
    before = len(engine._split)
    graphdef, state = nnx.split(model)
    engine._flat_split(graphdef, state)
    assert len(engine._split) == before + 1
    del state
    gc.collect()
    assert len(engine._split) == before
