"""Competitive programming: the completion's Python program runs in the sandbox against test cases.

The reference is JSON ``{"tests": [{"input": ..., "output": ...}, ...]}``; the program is the last
```python fenced block of the completion. ``correct`` is the fraction of tests whose stdout matches
the expected output (whitespace-normalized per line), or, with ``all_or_nothing``, 1.0 only if all
pass. The prompt source is a JSONL file of ``{"prompt", "tests"}`` lines, or, with no file, small
generated problems (sum, max, reverse, count) with hidden tests.
"""

from __future__ import annotations

import json
import re

from m1jax import storage
from m1jax.envs.base import Environment, Example, register_env
from m1jax.envs.sandbox import Limits, run_python

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python ... ```), or None."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else None


def _normalize(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def run_tests(code: str, tests: list[dict], limits: Limits) -> list[bool]:
    """Pass/fail per test; stops at the first failure that is not a wrong answer (crash, timeout...)."""
    passed = []
    for t in tests:
        r = run_python(code, t["input"], limits)
        passed.append(r.status == "ok" and _normalize(r.stdout) == _normalize(t["output"]))
        if r.status != "ok":
            break
    return passed + [False] * (len(tests) - len(passed))


# Generated problems: (statement, solution program, input maker).
_PROBLEMS = {
    "sum": ("Read integers (one line, space-separated) and print their sum.",
            "print(sum(map(int, input().split())))", lambda rng, n: " ".join(map(str, rng.integers(-99, 100, n)))),
    "max": ("Read integers (one line, space-separated) and print the largest.",
            "print(max(map(int, input().split())))", lambda rng, n: " ".join(map(str, rng.integers(-99, 100, n)))),
    "reverse": ("Read a line and print it reversed.", "print(input()[::-1])",
                lambda rng, n: "".join(rng.choice(list("abcxyz"), n))),
    "count": ("Read a line and print how many times the letter a occurs in it.", "print(input().count('a'))",
              lambda rng, n: "".join(rng.choice(list("abc"), n))),
}


def _solve(program: str, stdin: str) -> str:
    """Expected outputs of the generated problems, computed in-process from their trusted solutions."""
    import contextlib
    import io
    import sys

    out, old_stdin = io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            exec(program, {})  # noqa: S102 -- our own solution strings above, not a completion
    finally:
        sys.stdin = old_stdin
    return out.getvalue()


class CodeEnv(Environment):
    format_weight = 0.1

    def __init__(self, path: str | None = None, num_tests: int = 3, all_or_nothing: bool = True,
                 limits: Limits | None = None):
        self.num_tests, self.all_or_nothing = num_tests, all_or_nothing
        self.limits = limits or Limits(cpu_s=2, wall_s=4.0)
        self.rows = None
        if path is not None:
            self.rows = storage.read_jsonl(path, "code data")
            bad = [i for i, r in enumerate(self.rows) if not {"prompt", "tests"} <= set(r)]
            if bad or not self.rows:
                raise ValueError(f"{path}: every line needs 'prompt' and 'tests' (bad lines {bad[:5]}), and the "
                                 "file must not be empty.")

    def make_example(self, rng):
        if self.rows is not None:
            row = self.rows[int(rng.integers(len(self.rows)))]
            return Example(row["prompt"], json.dumps({"tests": row["tests"]}), row.get("solution"))
        name = sorted(_PROBLEMS)[int(rng.integers(len(_PROBLEMS)))]
        statement, program, make_input = _PROBLEMS[name]
        inputs = [make_input(rng, int(rng.integers(1, 8))) for _ in range(self.num_tests)]
        tests = [{"input": i + "\n", "output": _solve(program, i + "\n")} for i in inputs]
        prompt = f"{statement} Write a Python program in a ```python block."
        return Example(prompt, json.dumps({"tests": tests}), f"```python\n{program}\n```")

    def format_ok(self, completion):
        return extract_code(completion) is not None

    def verify(self, completion, reference):
        code = extract_code(completion)
        if code is None:
            return 0.0
        passed = run_tests(code, json.loads(reference)["tests"], self.limits)
        return float(all(passed)) if self.all_or_nothing else sum(passed) / len(passed)


register_env("code")(CodeEnv)
