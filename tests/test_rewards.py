"""Reward registry and fault-tolerant scoring."""

import time

import pytest

from m1jax.data import rewards


def test_registry_and_user_function():
    @rewards.register("test_len_parity")
    def parity(prompt, completion, reference):
        return float(len(completion) % 2 == 0)

    assert rewards.get("test_len_parity") is parity
    assert rewards.get("exact_match")("q", " 42 ", "42") == 1.0
    with pytest.raises(KeyError, match="registered"):
        rewards.get("nope")


def test_raising_and_hanging_rewards_score_zero_and_training_goes_on():
    def flaky(prompt, completion, reference):
        if completion == "boom":
            raise RuntimeError("bad parse")
        if completion == "hang":
            time.sleep(3)
        return 1.0

    t = time.perf_counter()
    report = rewards.score_all(flaky, ["p"] * 4, ["ok", "boom", "hang", "ok"], ["r"] * 4, timeout_s=0.5)
    assert time.perf_counter() - t < 2.5
    assert report.scores == [1.0, 0.0, 0.0, 1.0]
    assert report.errors == 1 and report.timeouts == 1
    assert any("RuntimeError: bad parse" in m for m in report.messages)


def test_math_verify_equivalences_in_scoring_threads():
    """math-verify compares values, not strings; and it runs in score_all's worker threads (its own
    signal-based timeouts would raise there: every sample would score 0)."""
    fn = rewards.get("math_verify")
    cases = [("7", "14/2", 1.0), ("The answer is \\boxed{7}", "7", 1.0), ("0.5", "\\frac{1}{2}", 1.0),
             ("7.0", "7", 1.0), ("8", "7", 0.0), ("no number here", "7", 0.0)]
    report = rewards.score_all(fn, ["q"] * len(cases), [c for c, _, _ in cases], [r for _, r, _ in cases], timeout_s=30)
    assert (report.errors, report.timeouts) == (0, 0), report.messages
    assert report.scores == [s for _, _, s in cases]


def test_user_function_by_module_or_file(tmp_path):
    assert rewards.get("m1jax.data.rewards:exact_match") is rewards.exact_match
    (tmp_path / "my_rewards.py").write_text("def longer(prompt, completion, reference):\n"
                                            "    return float(len(completion) > len(reference))\n")
    fn = rewards.get(f"{tmp_path}/my_rewards.py:longer")
    assert fn("p", "abc", "ab") == 1.0 and fn("p", "a", "ab") == 0.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        rewards.get(f"{tmp_path}/my_rewards.py:nope")
    with pytest.raises(FileNotFoundError, match="no file"):
        rewards.get(f"{tmp_path}/missing.py:longer")
    with pytest.raises(ImportError, match="cannot import 'no_such_pkg_m1jax.mod'"):
        rewards.get("no_such_pkg_m1jax.mod:fn")


def test_missing_optional_package_fails_at_lookup():
    @rewards.register("test_needs_missing_pkg", requires=("no_such_pkg_m1jax", "pip install no-such-pkg"))
    def needs(prompt, completion, reference):
        return 1.0

    with pytest.raises(ImportError, match="needs the 'no_such_pkg_m1jax' package: pip install no-such-pkg"):
        rewards.get("test_needs_missing_pkg")
