"""Metrics against values computed by hand, and through a real seqio Evaluator run."""
import functools
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from mmt_jax import metrics


def test_attribute_accuracy_compares_stripped_lowercase():
    targets = ["Red", "blue ", "Cotton", "wood"]
    predictions = ["red", "blue", "cotton blend", " Wood"]
    assert metrics.attribute_accuracy(targets, predictions) == {"attribute_accuracy": 0.75}


@pytest.mark.parametrize("precision, expected", [
    # Precision of the prefixes by confidence: 1/1, 2/2, 2/3, 3/4, 4/5, 4/6.
    (0.9, 2 / 6), (0.8, 4 / 6), (0.75, 4 / 6), (0.5, 4 / 6)])
def test_recall_at_precision_takes_longest_prefix_meeting_precision(precision, expected):
    correct = [True, True, False, True, True, False]
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert metrics.recall_at_precision(correct, confidence, precision) == pytest.approx(expected)


def test_recall_at_precision_does_not_split_ties():
    # Stopping after the second example would give 2/2 = 1.0 precision, but it ties with a wrong
    # one: the threshold 0.5 answers both (2/3), so only the first example can be answered.
    for correct, confidence in [([True, True, False, True], [0.9, 0.5, 0.5, 0.1]),
                                ([True, False, True, True], [0.9, 0.5, 0.5, 0.1])]:
        assert metrics.recall_at_precision(correct, confidence, 0.9) == 0.25
    assert metrics.recall_at_precision([True, True, True, False], [0.3] * 4, 0.75) == 0.75


def test_recall_at_precision_is_zero_when_unreachable():
    assert metrics.recall_at_precision([False, True], [0.9, 0.1], 0.9) == 0.0


def test_recall_at_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per example"):
        metrics.recall_at_precision([True, False], [0.5], 0.9)
    with pytest.raises(ValueError, match="at least one example"):
        metrics.recall_at_precision([], [], 0.9)
    with pytest.raises(ValueError, match="precision"):
        metrics.recall_at_precision([True], [0.5], 1.5)
    with pytest.raises(ValueError, match="nan"):
        metrics.recall_at_precision([True], [np.nan], 0.9)


def test_attribute_recall_at_precision_uses_scores_as_confidence():
    targets = ["red", "blue", "green", "black"]
    predictions = ["red", "navy", "green", "black"]
    # By score: red (right), navy (wrong), green (right), black (right): precisions 1, 1/2, 2/3, 3/4.
    scores = np.log([0.9, 0.8, 0.7, 0.6])
    result = metrics.attribute_recall_at_precision(targets, predictions, {"scores": scores})
    assert result == {"attribute_recall_at_precision_0.9": 0.25}
    at_70 = functools.partial(metrics.attribute_recall_at_precision, precision=0.7)
    assert at_70(targets, predictions, {"scores": scores}) == {"attribute_recall_at_precision_0.7": 0.75}
    with pytest.raises(ValueError, match="'scores'"):
        metrics.attribute_recall_at_precision(targets, predictions, {"logits": scores})
    with pytest.raises(ValueError, match="one entry per example"):
        metrics.attribute_recall_at_precision(targets, predictions, {"scores": scores[:3]})


def test_title_rouge1_by_hand():
    # rouge_score tokens: [red, cotton, t, shirt, for, men] vs [men, s, red, shirt]; 3 shared.
    # Recall 3/6, precision 3/4, F1 = 2 * 0.5 * 0.75 / 1.25 = 0.6. Second pair: identical.
    # Third: [red, red, shirt] vs [red, shirt]: a repeated word is matched once, recall 2/3, F1 0.8.
    targets = ["Red cotton T-shirt for men", "Wooden chair", "red red shirt"]
    predictions = ["men's red shirt", "wooden CHAIR", "red shirt"]
    result = metrics.title_rouge1(targets, predictions)
    assert result["title_rouge1_recall"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert result["title_rouge1_f1"] == pytest.approx((0.6 + 1 + 0.8) / 3)
    with pytest.raises(ValueError, match="one entry per example"):
        metrics.title_rouge1(targets, predictions[:2])


def test_yes_probability_mapping():
    p = metrics.yes_probability(["yes", " No", "maybe"], np.log([0.8, 0.8, 0.3]))
    np.testing.assert_allclose(p, [0.8, 0.2, 0.7])


def test_matching_metrics_by_hand():
    targets = ["yes", "no", "yes", "no"]
    predictions = ["yes", "yes", "no", "no"]
    scores = np.log([0.9, 0.6, 0.7, 0.8])  # P(yes) = 0.9, 0.6, 0.3, 0.2
    result = metrics.matching_metrics(targets, predictions, {"scores": scores})
    # Positive-negative pairs ranked right: (0.9, 0.6), (0.9, 0.2), (0.3, 0.2); not (0.3, 0.6).
    # Ranked: yes, no, yes, no -> AP = 0.5 * 1 + 0.5 * 2/3. Precision >= 0.9 only at 0.9: recall 1/2.
    assert result == pytest.approx({"match_accuracy": 0.5, "match_roc_auc": 0.75,
                                    "match_pr_auc": 0.5 + 1 / 3, "match_recall_at_precision_0.9": 0.5})
    at_60 = metrics.matching_metrics(targets, predictions, {"scores": scores}, precision=0.6)
    assert at_60["match_recall_at_precision_0.6"] == 1.0


def test_matching_metrics_single_class_and_bad_input():
    result = metrics.matching_metrics(["yes", "yes"], ["yes", "no"], {"scores": [-0.1, -0.2]})
    assert result["match_accuracy"] == 0.5
    assert all(math.isnan(result[k]) for k in
               ["match_roc_auc", "match_pr_auc", "match_recall_at_precision_0.9"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metrics.matching_metrics(["yes", "maybe"], ["yes", "no"], {"scores": [0.0, 0.0]})
    with pytest.raises(ValueError, match="one entry per example"):
        metrics.matching_metrics(["yes", "no"], ["yes"], {"scores": [0.0, 0.0]})
    with pytest.raises(ValueError, match="shape"):
        metrics.matching_metrics(["yes", "no"], ["yes", "no"], {"scores": [[0.0], [0.0]]})


def test_metric_fns_run_in_seqio_evaluator():
    """A registered Task with our metric fns, evaluated by seqio.Evaluator on canned predictions."""
    vocab = seqio.ByteVocabulary()
    targets = ["yes", "no", "yes", "no"]
    predictions = ["yes", "yes", "no", "no"]
    scores = np.log([0.9, 0.6, 0.7, 0.8])

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": ["match: a", "match: b", "match: c",
                                                              "match: d"], "targets": targets})

    metric_fns = [metrics.attribute_accuracy, metrics.title_rouge1, metrics.matching_metrics,
                  functools.partial(metrics.attribute_recall_at_precision, precision=0.7)]
    name = "mmt_jax_test_metrics_matching"
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
        output_features={k: seqio.Feature(vocab) for k in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        metric_fns=metric_fns)
    try:
        task = seqio.get_mixture_or_task(name)
        assert task.predict_metric_fns == metric_fns[:2]
        assert task.predict_with_aux_metric_fns == metric_fns[2:]
        evaluator = seqio.Evaluator(name, seqio.EncDecFeatureConverter(pack=False),
                                    sequence_length={"inputs": 16, "targets": 8},
                                    async_compute_metrics=False)

        def predict_fn(dataset):  # Like a model: padded decoder output [L], EOS then padding.
            tokens = [vocab.encode(p) + [vocab.eos_id] for p in predictions]
            tokens = [np.pad(t, (0, 8 - len(t))) for t in tokens]
            return [(int(i), tokens[int(i)]) for i, _ in dataset.as_numpy_iterator()]

        def predict_with_aux_fn(dataset):
            outputs = predict_fn(dataset)
            return outputs, {"scores": [scores[i] for i, _ in outputs]}

        result, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn,
                                       predict_with_aux_fn=predict_with_aux_fn)
        got = result.result()[name]
    finally:
        seqio.TaskRegistry.remove(name)
    assert got == pytest.approx({"attribute_accuracy": 0.5, "title_rouge1_recall": 0.5,
                                 "title_rouge1_f1": 0.5, "match_accuracy": 0.5, "match_roc_auc": 0.75,
                                 "match_pr_auc": 0.5 + 1 / 3, "match_recall_at_precision_0.9": 0.5,
                                 # By score: right, right, wrong, wrong; precisions 1, 1, 2/3, 2/4.
                                 "attribute_recall_at_precision_0.7": 0.5})


@pytest.mark.parametrize("precision, expected", [(0.75, (0.6, 0.6)), (0.9, (0.8, 0.4)),
                                                 (1.0, (0.8, 0.4))])
def test_threshold_at_precision_by_hand(precision, expected):
    """Prefixes by confidence: 1/1, 2/2, 2/3, 3/4, 3/5 right. At 0.75 the longest valid prefix
    ends at 0.6 (3 of 4 answered right, 3 of 5 found); at 0.9 and 1.0 at 0.8."""
    correct, confidence = [True, True, False, True, False], [0.9, 0.8, 0.7, 0.6, 0.5]
    assert metrics.threshold_at_precision(correct, confidence, precision) == pytest.approx(expected)
    assert metrics.threshold_at_precision([False, True], [0.9, 0.1], 0.9) == (None, 0.0)


def test_a_threshold_keeps_its_precision_on_the_data_it_was_picked_on():
    """Whatever the scores: answering the examples at or above the picked threshold is right at
    least 90% of the time, and no lower threshold that keeps 90% finds more right answers."""
    from mmt_jax import acceptance
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        scores = np.round(rng.normal(size=n), int(rng.integers(0, 3)))  # ties too
        targets = ["red"] * n
        right = rng.random(n) < 1 / (1 + np.exp(-2 * scores - rng.normal()))
        predictions = ["red" if r else "blue" for r in right]
        threshold = acceptance.pick_threshold(targets, predictions, scores)
        if threshold is None:
            assert all(np.mean(right[scores >= t]) < 0.9 for t in scores)
            continue
        taken = scores >= threshold
        assert np.mean(right[taken]) >= 0.9, trial
        better = [t for t in scores if np.mean(right[scores >= t]) >= 0.9
                  and right[scores >= t].sum() > right[taken].sum()]
        assert not better, trial
