"""Tasks (arith, JSONL, one environment), SFT rows, completion text, and the trainer's rows built from rollouts."""

import json
import string

import ml_collections
import numpy as np
import pytest

from m1jax.data import arith, tasks
from m1jax.data.problem import Problem, completion_text, sft_batch
from m1jax.rl.batch import rollout_batch
from m1jax.tokenizer import CharTokenizer

ARITH = {"task": "arith", "digits": 2, "eval_size": 5, "eval_seed": 7}
CHARS = "".join(chr(i) for i in range(32, 127))


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def jsonl_data(path, **kw):
    return {"task": "jsonl", "path": path, "eval_path": "", "eval_size": 2, "tokenizer": "chars:" + CHARS,
            "max_prompt_tokens": 16, "max_new_tokens": 4, **kw}


def test_arith_task_is_the_default_jobs_encoding():
    task = tasks.make_task(ARITH)
    p = task.eval_set[0]
    assert p == arith.make_problem(0, 7, 2)
    assert len(p.prompt_ids) == task.max_prompt_len == 7  # bos 12+34=
    assert task.tokenizer.decode(p.prompt_ids) == arith.decode(p.prompt_ids)
    ids, mask = sft_batch([p], task.tokenizer, task.max_prompt_len + task.max_new_tokens)
    expected = p.prompt_ids + arith.encode(p.answer) + [arith.EOS]  # bos a+b= sum eos: no padding
    assert ids[0].tolist() == expected and mask[0].tolist() == [0] * 7 + [1] * 4
    first = [next(iter(task.stream(3).to_iter_dataset())) for _ in range(2)]
    assert first[0] == first[1] == arith.make_problem(0, 3, 2)


def test_completion_text_cuts_at_eos_and_marks_truncation():
    tok = CharTokenizer("0123456789")
    assert completion_text(tok, tok.encode("42") + [tok.eos_id] + tok.encode("9")) == "42"
    assert completion_text(tok, tok.encode("42")) == "42…"  # no eos: cut at the length limit


def test_sft_rows_are_right_padded_with_a_mask_on_answer_and_eos():
    tok = CharTokenizer("ab=")
    probs = [Problem([tok.bos_id] + tok.encode("ab="), "b"), Problem([tok.bos_id] + tok.encode("a="), "ab")]
    ids, mask = sft_batch(probs, tok, width=7)
    a, b, eq = tok.encode("ab=")
    assert ids.tolist() == [[1, a, b, eq, b, 2, 0], [1, a, eq, a, b, 2, 0]]
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="longer than 5"):
        sft_batch(probs, tok, width=5)


def test_jsonl_task_holds_out_the_last_lines_and_reshuffles_every_epoch(tmp_path):
    rows = [{"prompt": f"What is {i}+1?", "answer": i + 1} for i in range(6)]
    task = tasks.make_task(jsonl_data(jsonl(tmp_path / "p.jsonl", rows + [""])))  # a blank line is skipped
    tok = task.tokenizer
    assert [tok.decode(p.prompt_ids) for p in task.eval_set] == ["What is 4+1?", "What is 5+1?"]
    assert [p.answer for p in task.eval_set] == ["5", "6"]  # numbers become strings
    assert task.eval_set[0].prompt_ids[0] == tok.bos_id
    it = iter(task.stream(0).to_iter_dataset())
    epochs = [[tok.decode(next(it).prompt_ids) for _ in range(4)] for _ in range(3)]
    assert all(sorted(e) == [f"What is {i}+1?" for i in range(4)] for e in epochs)  # each epoch: all 4 once
    assert len({tuple(e) for e in epochs}) > 1  # in a new order
    again = iter(task.stream(0).to_iter_dataset())
    assert [tok.decode(next(again).prompt_ids) for _ in range(4)] == epochs[0]  # same seed, same order
    eval_path = jsonl(tmp_path / "q.jsonl", rows)
    with_eval = tasks.make_task(jsonl_data(eval_path, eval_path=eval_path))
    assert len(with_eval.eval_set) == 2 and with_eval.eval_set[0].answer == "1"  # first eval_size lines of eval_path


@pytest.mark.parametrize("line, error", [
    ("{not json", "line 2: not JSON"),
    ('{"question": "1+1", "answer": "2"}', 'line 2: expected {"prompt": str'),
    ('{"prompt": "é?", "answer": "2"}', r"line 2: characters \['é'\] are not in"),
    ('{"prompt": "' + "x" * 16 + '", "answer": "2"}', "line 2: the prompt is 17 tokens, more than data.max_prompt_tokens=16"),
])
def test_jsonl_errors_name_the_line_and_the_fix(tmp_path, line, error):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1", "answer": "2"}, line] + [{"prompt": "2+2", "answer": 4}] * 3)
    with pytest.raises(ValueError, match=error):
        tasks.make_task(jsonl_data(path))


def test_task_config_errors():
    with pytest.raises(ValueError, match="data.task='gsm'"):
        tasks.make_task({**ARITH, "task": "gsm"})
    with pytest.raises(ValueError, match=r"missing keys \['eval_seed'\], unknown keys \['path'\]"):
        tasks.make_task({"task": "arith", "digits": 2, "eval_size": 5, "path": "x"})
    with pytest.raises(ValueError, match="data.path: set it"):
        tasks.make_task(jsonl_data(None))


def test_rollout_batch_rows_align_completion_targets_with_variable_prompts():
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    m = 4
    tokens = np.array([[20, 21, 2, 0], [22, 23, 24, 25], [26, 0, 0, 0]])
    logp = np.array([[-0.1, -0.2, -0.3, 0], [-0.4, -0.5, -0.6, -0.7], [-0.8, 0, 0, 0]], np.float32)
    lengths = np.array([3, 4, 1])
    ids, comp, old = rollout_batch(prompts, tokens, logp, lengths, width=4 + m, pad_id=0)
    for i, p in enumerate(prompts):  # independent check: row = prompt, completion, pad
        assert ids[i].tolist() == p + tokens[i, :lengths[i]].tolist() + [0] * (8 - len(p) - lengths[i])
        targets = np.flatnonzero(comp[i])  # target t predicts ids[t + 1]
        assert ids[i, targets + 1].tolist() == tokens[i, :lengths[i]].tolist()
        np.testing.assert_array_equal(old[i, targets], logp[i, :lengths[i]])
        assert not old[i, ~comp[i]].any()
    with pytest.raises(ValueError, match="width=7 < longest prompt"):
        rollout_batch(prompts, tokens, logp, lengths, width=7, pad_id=0)


def test_jsonl_stream_is_checkpointable(tmp_path):
    task = tasks.make_task(jsonl_data(jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}", "answer": i} for i in range(9)])))
    it = iter(task.stream(1).to_iter_dataset())
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = [next(it).answer for _ in range(6)]
    resumed = iter(task.stream(1).to_iter_dataset())
    resumed.set_state(state)
    assert [next(resumed).answer for _ in range(6)] == rest


def test_one_task_system_reward_and_environment_tasks_share_the_interface():
    """arith/JSONL tasks are scored by rl.reward; data.task=env is one registered environment,
    scored by its verifier; both serve train.py through the same Task methods."""
    config = ml_collections.ConfigDict({"data": ARITH, "rl": {"reward": "exact_match"}})
    task = tasks.from_config(config)
    p = task.eval_set[0]
    assert task.score_all(["q", "q"], [p.answer, p.answer + "0"], [p.answer] * 2).scores == [1.0, 0.0]
    assert task.step_metrics(0, [p], [[1.0]], [3]) == {}
    config.rl.reward = "no_such_reward"
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        tasks.from_config(config)

    env = tasks.make_task({"task": "env", "env": "sort", "args": {"difficulty": 1}, "eval_size": 2, "eval_seed": 3,
                           "tokenizer": "chars:" + string.printable, "max_prompt_tokens": 96, "max_new_tokens": 32})
    held = env.eval_set[0]
    ref = json.loads(json.loads(held.answer)["reference"])
    solved = "\\boxed{" + ", ".join(map(str, ref)) + "}"
    assert len(env.eval_set) == 2
    assert env.score_all(["q"] * 2, [solved, "\\boxed{0}"], [held.answer] * 2).scores == [1.0, 0.0]
    it = env.rl_iterator(seed=0)
    env.begin_step(it, 0)
    rl_problem = next(it)
    assert json.loads(rl_problem.answer)["env"] == "sort"
    m = env.step_metrics(0, [rl_problem], [[1.1, 0.1]], [5, 7])
    assert m["curriculum/weight/sort"] == 1.0 and m["env/sort/solved"] == 0.5
