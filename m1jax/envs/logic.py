r"""Logic puzzles generated here, each family with an exact verifier and a ``difficulty`` knob.

* ``sort``: sort ``difficulty + 2`` integers ascending; answer ``\boxed{1, 5, 9}``.
* ``boolean``: evaluate a random and/or/not expression of depth ``difficulty``; ``\boxed{True}``.
* ``countdown``: reach a target with ``difficulty + 1`` numbers, each used once, and + - * /;
  answer the expression, e.g. ``\boxed{(3 + 5) * 2}``; checked by exact rational evaluation.
* ``knights``: ``difficulty + 1`` islanders, knights always tell the truth and knaves always lie; the
  puzzle has exactly one consistent assignment; answer ``\boxed{A: knight, B: knave}``. The verifier
  checks the statements, not a stored answer.
* ``logic``: a uniform mixture of the families above.

References are JSON, so verifiers need nothing but the completion and the reference.
"""

from __future__ import annotations

import ast
import itertools
import json
import operator
import re
from fractions import Fraction

from m1jax.envs.base import Environment, Example, extract_boxed, register_env

FAMILIES = ("sort", "boolean", "countdown", "knights")


def _ex(prompt: str, reference, solution: str) -> Example:
    return Example(f"{prompt} Put the final answer in \\boxed{{}}.", json.dumps(reference), f"\\boxed{{{solution}}}")


# ---------------------------------------------------------------------------------------------- sort
def make_sort(rng, difficulty):
    xs = [int(v) for v in rng.integers(-99, 100, size=difficulty + 2)]
    return _ex(f"Sort ascending: {', '.join(map(str, xs))}.", sorted(xs), ", ".join(map(str, sorted(xs))))


def verify_sort(answer: str, ref) -> bool:
    try:
        return [int(v) for v in answer.split(",")] == ref
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------- boolean
def _bool_expr(rng, depth):
    if depth == 0:
        return str(bool(rng.integers(2)))
    op = int(rng.integers(3))
    if op == 0:
        return f"not {_bool_expr(rng, depth - 1)}"
    return f"({_bool_expr(rng, depth - 1)} {'and' if op == 1 else 'or'} {_bool_expr(rng, depth - 1)})"


def _eval_bool(node) -> bool:
    """Evaluate an and/or/not expression over True/False literals (anything else raises)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval_bool(node.operand)
    if isinstance(node, ast.BoolOp):
        vals = [_eval_bool(v) for v in node.values]
        return all(vals) if isinstance(node.op, ast.And) else any(vals)
    raise ValueError(f"not a boolean expression: {ast.dump(node)}")


def make_boolean(rng, difficulty):
    expr = _bool_expr(rng, difficulty)
    value = _eval_bool(ast.parse(expr, mode="eval").body)
    return _ex(f"Evaluate: {expr}.", value, str(value))


def verify_boolean(answer: str, ref) -> bool:
    return answer.strip().lower() == str(ref).lower()


# ----------------------------------------------------------------------------------------- countdown
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_arith(node, used: list[int]) -> Fraction:
    """Exact value of an expression of integer literals and + - * / (recording the literals used)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_arith(node.left, used), _eval_arith(node.right, used)
        return _OPS[type(node.op)](left, right)  # division by zero raises ZeroDivisionError
    raise ValueError("only integers, + - * / and parentheses are allowed")


def make_countdown(rng, difficulty):
    nums = [int(v) for v in rng.integers(1, 13, size=difficulty + 1)]
    expr = str(nums[0])
    for n in nums[1:]:
        expr = f"({expr} {'+-*'[int(rng.integers(3))]} {n})"
    target = _eval_arith(ast.parse(expr, mode="eval").body, [])
    order = [int(v) for v in rng.permutation(nums)]
    return _ex(f"Using each of the numbers {order} exactly once and + - * /, make {target}.",
               {"numbers": order, "target": int(target)}, expr)


def verify_countdown(answer: str, ref) -> bool:
    if len(answer) > 200:
        return False
    used: list[int] = []
    try:
        value = _eval_arith(ast.parse(answer, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return False
    return sorted(used) == sorted(ref["numbers"]) and value == ref["target"]


# ------------------------------------------------------------------------------------------- knights
NAMES = "ABCDEFGH"


def _holds(stmt, world) -> bool:
    """world: name -> True for a knight. Statements: [kind, X] or [kind, X, Y]."""
    kind, *who = stmt
    k = [world[w] for w in who]
    return {"knight": lambda: k[0], "knave": lambda: not k[0], "both_knights": lambda: k[0] and k[1],
            "either_knave": lambda: not (k[0] and k[1]), "same": lambda: k[0] == k[1]}[kind]()


def _consistent(statements, world) -> bool:
    return all(_holds(s, world) == world[speaker] for speaker, s in statements)


def _say(stmt) -> str:
    kind, *w = stmt
    return {"knight": f"{w[0]} is a knight", "knave": f"{w[0]} is a knave",
            "both_knights": f"{w[0]} and {w[-1]} are both knights", "either_knave": f"{w[0]} or {w[-1]} is a knave",
            "same": f"{w[0]} and {w[-1]} are the same kind"}[kind]


def make_knights(rng, difficulty):
    names = list(NAMES[:difficulty + 1])
    kinds = ("knight", "knave", "both_knights", "either_knave", "same")
    while True:  # resample until exactly one assignment is consistent (a few tries at these sizes)
        statements = []
        for speaker in names:
            kind = kinds[int(rng.integers(len(kinds)))]
            others = [str(n) for n in rng.choice(names, size=2, replace=False)]
            statements.append((speaker, [kind, *others[: 1 if kind in ("knight", "knave") else 2]]))
        worlds = [dict(zip(names, bits)) for bits in itertools.product((True, False), repeat=len(names))]
        sols = [w for w in worlds if _consistent(statements, w)]
        if len(sols) == 1:
            break
    text = " ".join(f'{s} says: "{_say(stmt)}."' for s, stmt in statements)
    answer = ", ".join(f"{n}: {'knight' if sols[0][n] else 'knave'}" for n in names)
    return _ex(f"Knights always tell the truth, knaves always lie. {text} Who is what?",
               {"names": names, "statements": statements}, answer)


def verify_knights(answer: str, ref) -> bool:
    pairs = re.findall(r"([A-H])\s*[:=]\s*(knight|knave)", answer, flags=re.IGNORECASE)
    world = {n.upper(): kind.lower() == "knight" for n, kind in pairs}
    if len(pairs) != len(ref["names"]) or set(world) != set(ref["names"]):
        return False
    return _consistent([(s, stmt) for s, stmt in ref["statements"]], world)


# -------------------------------------------------------------------------------------- environments
MAKERS = {"sort": make_sort, "boolean": make_boolean, "countdown": make_countdown, "knights": make_knights}
VERIFIERS = {"sort": verify_sort, "boolean": verify_boolean, "countdown": verify_countdown, "knights": verify_knights}


def _family_of(reference: dict | list | bool) -> str:
    if isinstance(reference, bool):
        return "boolean"
    if isinstance(reference, list):
        return "sort"
    return "countdown" if "target" in reference else "knights"


class LogicEnv(Environment):
    """One family, or a uniform mixture of several (``families``)."""

    def __init__(self, families=FAMILIES, difficulty: int = 2):
        families = (families,) if isinstance(families, str) else tuple(families)
        unknown = set(families) - set(FAMILIES)
        if unknown or not families:
            raise ValueError(f"logic families {sorted(unknown)} unknown; choose from {FAMILIES}.")
        if not 1 <= difficulty <= len(NAMES) - 1:
            raise ValueError(f"logic difficulty={difficulty}: must be in [1, {len(NAMES) - 1}].")
        self.families, self.difficulty = families, difficulty

    def make_example(self, rng):
        family = self.families[int(rng.integers(len(self.families)))]
        return MAKERS[family](rng, self.difficulty)

    def verify(self, completion, reference):
        answer = extract_boxed(completion)
        ref = json.loads(reference)
        return 1.0 if answer is not None and VERIFIERS[_family_of(ref)](answer, ref) else 0.0


register_env("logic")(LogicEnv)
for _family in FAMILIES:
    register_env(_family)(lambda difficulty=2, _f=_family: LogicEnv((_f,), difficulty))
