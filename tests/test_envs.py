"""Environments and verifiers: known-correct answers score 1, known-wrong answers 0, format apart."""

import json

import numpy as np
import pytest

from m1jax.data import rewards
from m1jax.envs import Example, FunctionEnv, extract_boxed, make_env, register_env
from m1jax.envs.logic import FAMILIES


def test_extract_boxed_matches_braces_and_takes_the_last():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{ 2 }") == "2"
    assert extract_boxed(r"\boxed{unclosed") is None and extract_boxed("no box") is None


@pytest.mark.parametrize("name", ["math", "logic", *FAMILIES, "code"])
def test_every_environment_solution_is_correct_and_junk_is_not(name):
    env = make_env(name)
    for i in range(6):
        ex = env.example(seed=3, index=i)
        assert ex.env == name and ex.solution is not None
        assert env.score(ex.solution, ex.reference).reward == pytest.approx(1 + env.format_weight)
        junk = env.score("I don't know.", ex.reference)
        assert (junk.correct, junk.format, junk.reward) == (0.0, 0.0, 0.0)
    assert env.example(3, 0) == env.example(3, 0) and env.example(3, 0) != env.example(4, 0)


def test_math_verify_accepts_equivalent_forms_and_rejects_wrong_ones():
    env = make_env("math")
    ref = r"\frac{19}{12}"
    for ok in (r"\boxed{\frac{38}{24}}", r"\boxed{19/12}", r"The answer is \boxed{\dfrac{19}{12}}."):
        assert env.verify(ok, ref) == 1.0, ok
    for wrong in (r"\boxed{\frac{19}{13}}", r"\boxed{1.58}", "19/12 without a box", r"\boxed{}"):
        assert env.verify(wrong, ref) == 0.0, wrong
    assert env.score(r"\boxed{2} or \boxed{19/12}", ref).format == 0.0  # two boxes: no format reward
    assert env.verify(r"\boxed{x = -5}", "-5") == 1.0


def test_math_from_jsonl(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
    env = make_env("math", path=str(path))
    ex = env.example(0, 0)
    assert ex.prompt.startswith("What is 2+2?") and ex.reference == "4"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        make_env("math", path=str(tmp_path / "bad.jsonl"))


def test_logic_verifiers_on_hand_written_cases():
    env = make_env("logic")
    assert env.verify(r"\boxed{-3, 1, 2}", json.dumps([-3, 1, 2])) == 1.0
    assert env.verify(r"\boxed{1, -3, 2}", json.dumps([-3, 1, 2])) == 0.0
    assert env.verify(r"\boxed{false}", "false") == 1.0 and env.verify(r"\boxed{True}", "false") == 0.0
    ref = json.dumps({"numbers": [3, 5, 2], "target": 16})
    assert env.verify(r"\boxed{(3 + 5) * 2}", ref) == 1.0
    assert env.verify(r"\boxed{2 * (5 + 3)}", ref) == 1.0  # any correct expression, not the stored one
    assert env.verify(r"\boxed{(3 + 5) * 2 + 0}", ref) == 0.0  # 0 is not one of the numbers
    assert env.verify(r"\boxed{8 * 2}", ref) == 0.0  # numbers not used
    assert env.verify(r"\boxed{__import__('os')}", ref) == 0.0
    assert env.verify(r"\boxed{(3 + 5) * 2 / 0}", ref) == 0.0
    # A says "B is a knave", B says "A and B are the same kind": only A knight, B knave is consistent.
    ref = json.dumps({"names": ["A", "B"], "statements": [["A", ["knave", "B"]], ["B", ["same", "A", "B"]]]})
    assert env.verify(r"\boxed{A: knight, B: knave}", ref) == 1.0
    assert env.verify(r"\boxed{A: knave, B: knight}", ref) == 0.0
    assert env.verify(r"\boxed{A: knight}", ref) == 0.0


def test_knights_puzzles_have_exactly_one_solution_and_difficulty_scales():
    from m1jax.envs.logic import _consistent

    for d in (1, 3):
        env = make_env("knights", difficulty=d)
        ex = env.example(1, 0)
        ref = json.loads(ex.reference)
        assert len(ref["names"]) == d + 1
        worlds = [dict(zip(ref["names"], bits)) for bits in np.ndindex(*(2,) * (d + 1))]
        assert sum(_consistent(ref["statements"], {k: bool(v) for k, v in w.items()}) for w in worlds) == 1
    assert len(json.loads(make_env("sort", difficulty=5).example(0, 0).reference)) == 7
    with pytest.raises(ValueError, match="unknown"):
        make_env("logic", families=("sudoku",))


def test_code_env_passes_correct_program_and_fails_wrong_or_hostile():
    env = make_env("code")
    ref = json.dumps({"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]})
    good = "```python\nprint(sum(map(int, input().split())))\n```"
    assert env.score(good, ref).reward == pytest.approx(1.1)
    assert env.score("```python\nprint(3)\n```", ref).correct == 0.0  # passes one of two
    assert make_env("code", all_or_nothing=False).verify("```python\nprint(3)\n```", ref) == 0.5
    assert env.score("```python\nwhile True: pass\n```", ref).correct == 0.0
    assert env.score("```python\nimport os; os.abort()\n```", ref).correct == 0.0
    assert env.score("print(3)", ref).format == 0.0  # no fenced block


def test_registry_user_environment_in_a_few_lines():
    @register_env("test_reverse")
    def reverse(length: int = 4):
        def make(rng):
            word = "".join(rng.choice(list("abc"), length))
            return Example(f"Reverse {word}.", word[::-1], solution=f"\\boxed{{{word[::-1]}}}")

        return FunctionEnv("test_reverse", make, lambda completion, ref: float(extract_boxed(completion) == ref))

    env = make_env("test_reverse", length=6)
    ex = env.example(0, 0)
    assert len(ex.reference) == 6 and env.score(ex.solution, ex.reference).correct == 1.0
    # the registry's reward signature: scored with timeouts by m1jax.data.rewards.score_all
    report = rewards.score_all(env.reward, [ex.prompt] * 2, [ex.solution, "nope"], [ex.reference] * 2)
    assert report.scores == [pytest.approx(1.1), 0.0]
    with pytest.raises(KeyError, match="registered"):
        make_env("no_such_env")
    with pytest.raises(TypeError, match="bad arguments"):
        make_env("test_reverse", colour="red")
    with pytest.raises(ValueError, match="already registered"):
        register_env("test_reverse")(reverse)


def test_readme_add_an_environment_snippet_works():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("Add an environment (a prompt source and a reward function)"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1).replace('"reverse"', '"readme_reverse"')
    exec(code, {})  # noqa: S102 -- the README's own example
    env = make_env("readme_reverse", length=7)
    ex = env.example(0, 1)
    assert len(ex.reference) == 7 and env.score(ex.solution, ex.reference).reward == pytest.approx(1.1)
    assert env.score("\\boxed{nope}", ex.reference).reward == pytest.approx(0.1)
