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
