"""Collapse said out loud (issue 19, mmt_jax/task_health.py): the label prior's entropy against hand
computations, and the two warnings' thresholds."""
import math

import pytest

from mmt_jax import task_health


def _prior_warning(task_name, scored, step):
    checked = task_health.prior_check(task_name, scored, step)
    return None if checked is None else checked[2]


def test_label_prior_entropy_by_hand():
    assert task_health.label_prior_entropy(["yes", "no"] * 8) == pytest.approx(math.log(2))
    # 3/4 'red', 1/4 'blue': -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623
    assert task_health.label_prior_entropy(["red"] * 6 + ["blue"] * 2) == pytest.approx(0.562335,
                                                                                       abs=1e-6)
    # Three equally frequent answers: ln 3.
    assert task_health.label_prior_entropy(["a", "b", "c"] * 5) == pytest.approx(math.log(3))


@pytest.mark.parametrize("targets", [["yes"] * 10, ["yes"], [f"title {i}" for i in range(40)]],
                         ids=["one answer", "one example", "open-ended"])
def test_no_prior_without_a_small_answer_set(targets):
    assert task_health.label_prior_entropy(targets) is None
    assert _prior_warning("t", [(t, 0.1) for t in targets], 100) is None


def test_prior_loss_warning_fires_at_the_prior_and_not_below():
    at_prior = [("yes", 0.70), ("no", 0.68)] * 20  # mean 0.69 = ln 2
    message = _prior_warning("demo_match", at_prior, 600)
    assert task_health.prior_check("demo_match", at_prior, 600)[:2] == pytest.approx(
        (0.69, math.log(2)))
    assert "demo_match" in message and "step 600" in message
    assert "0.690 nats" in message and "0.693" in message and "2 answers" in message
    # 5% tolerance: 0.66 is within it (0.66 > 0.95 ln 2 = 0.658), 0.65 is below.
    assert _prior_warning("t", [("yes", 0.66), ("no", 0.66)], 1)
    assert _prior_warning("t", [("yes", 0.65), ("no", 0.65)], 1) is None
    # Far above the prior (an untrained model) is also "not learned from the inputs".
    assert _prior_warning("t", [("yes", 9.0), ("no", 9.0)], 1)


def test_constant_predictions_warning():
    assert task_health.constant_predictions_warning("m", ["no"] * 5) == (
        "task m: all 5 predictions are 'no'")
    assert task_health.constant_predictions_warning("m", ["no", "yes", "no"]) is None
    assert task_health.constant_predictions_warning("m", ["no"]) is None
