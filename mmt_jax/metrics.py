"""Evaluation metrics of MMT4 (sections 4.2-4.4) as seqio metric functions.

seqio (0.0.20) picks how to call a metric function from the names of its required positional
arguments (`Task._all_metric_fns`, `PassthroughLegacyMetric.from_metric_fn`):

  `fn(targets, predictions)`              decoded, postprocessed strings;
  `fn(targets, scores)`                   log-likelihood of each *target* (teacher forcing);
  `fn(targets, predictions, aux_values)`  decoded strings plus the aux dict of
                                          `predict_batch_with_aux`, here `{"scores": [N]}`.

Arguments with a default are ignored by that check, so `precision=0.9` can be bound with
`functools.partial(fn, precision=0.95)` and the function still lands in the same group. Every
`fn(...)` below returns `{name: float}` with fractions in [0, 1] and key names that say the task.

Confidence-based metrics use the third form: `aux_values["scores"]` is the log-probability of the
decoded sequence (`Model.predict_batch_with_aux`; greedy decoding, or beam search without length
penalty, so that `exp(score)` is a probability). One decoding pass then gives both the answer and
its confidence; a score-based `fn(targets, scores)` only sees the likelihood of the reference.

Strings are compared after `strip().lower()`; "Red " and "red" are the same attribute value.
Empty inputs and inputs of different lengths raise `ValueError`. Ranking metrics that are
undefined because the targets hold a single class (ROC-AUC, PR-AUC, recall at precision of
image-text matching) are `nan`, so one degenerate eval split does not abort a training run.
"""
from typing import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer
from sklearn import metrics as skm


def _normalize(text: str) -> str:
    return text.strip().lower()


def _check_lengths(**named: Sequence) -> int:
    lengths = {name: len(value) for name, value in named.items()}
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"Metrics need at least one example; got lengths {lengths}.")
    if any(length != n for length in lengths.values()):
        raise ValueError(f"Inputs must have one entry per example; got lengths {lengths}.")
    return n


def _check_precision(precision: float) -> None:
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1]; got {precision}.")


def _scores(aux_values: Mapping[str, Sequence[float]]) -> np.ndarray:
    if "scores" not in aux_values:
        raise ValueError(f"aux_values needs 'scores' (log-probability per decoded sequence); "
                         f"got keys {sorted(aux_values)}.")
    scores = np.asarray(aux_values["scores"], np.float64)
    if scores.ndim != 1:
        raise ValueError(f"Expected one score per example (shape [N]); got shape {scores.shape}. "
                         "Decode with return_all_decodes=False.")
    return scores


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """`[N]` bool: each prediction equal to its reference, case and surrounding spaces aside."""
    _check_lengths(targets=targets, predictions=predictions)
    return np.array([_normalize(t) == _normalize(p) for t, p in zip(targets, predictions)])


def attribute_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Fraction of generated attribute values equal to the reference (MMT4 sec. 4.2, Tables 1-2)."""
    return {"attribute_accuracy": float(np.mean(exact_match(targets, predictions)))}


def recall_at_precision(correct: Sequence[bool], confidence: Sequence[float],
                        precision: float = 0.9) -> float:
    """Largest fraction of all examples answered correctly while keeping precision >= `precision`.

    Answering the examples whose confidence is >= t gives precision(t) = correct answered / answered
    and recall(t) = correct answered / all examples; the result is the max of recall(t) over the t
    with precision(t) >= `precision`, or 0.0 when no t reaches it. Equivalently: sort by confidence,
    descending, and take the longest prefix that meets the precision. A threshold cannot split
    examples of equal confidence, so prefixes only end where the confidence changes.
    """
    return threshold_at_precision(correct, confidence, precision)[1]


def threshold_at_precision(correct: Sequence[bool], confidence: Sequence[float],
                           precision: float = 0.9) -> tuple[float | None, float]:
    """`(t, recall(t))` for the `recall_at_precision` operating point: answering the examples
    whose confidence is >= t keeps precision >= `precision` with the most correct answers (the
    lowest such t among equals); `(None, 0.0)` when no t reaches the precision."""
    n = _check_lengths(correct=correct, confidence=confidence)
    _check_precision(precision)
    correct, confidence = np.asarray(correct, bool), np.asarray(confidence, np.float64)
    if np.isnan(confidence).any():
        raise ValueError("confidence contains nan.")
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    answered = np.arange(1, n + 1)
    ranked = confidence[order]
    threshold_ends = np.append(ranked[1:] != ranked[:-1], True)  # last example of each tie group
    valid = threshold_ends & (hits / answered >= precision)
    if not valid.any():
        return None, 0.0
    best = np.flatnonzero(valid & (hits == hits[valid].max()))[-1]
    return float(ranked[best]), float(hits[best] / n)


def attribute_recall_at_precision(targets: Sequence[str], predictions: Sequence[str],
                                  aux_values: Mapping[str, Sequence[float]],
                                  precision: float = 0.9) -> dict[str, float]:
    """`recall_at_precision` of exact-match attribute values, confidence = sequence log-likelihood.

    The operating point of an attribute extractor that only fills in values it is sure of: the share
    of products that get a correct value when at least `precision` of the filled-in values are right
    (MMT4 sec. 4.2 reports accuracy only; this is the same metric Table 4 uses for matching).
    """
    correct = exact_match(targets, predictions)
    scores = _scores(aux_values)
    _check_lengths(targets=targets, scores=scores)
    return {f"attribute_recall_at_precision_{precision:g}": recall_at_precision(correct, scores, precision)}


def title_rouge1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 recall and F1 of generated titles, averaged over examples (MMT4 sec. 4.3).

    Recall is the share of reference unigrams (counted with multiplicity) found in the generated
    title: the paper's "18% of the words in each title". Google's `rouge_score` tokenizer lowercases
    and keeps runs of [a-z0-9] only (other characters split words and non-ASCII letters are dropped);
    no stemming, so brand and model names are matched as written. A reference with no tokens scores 0.
    """
    _check_lengths(targets=targets, predictions=predictions)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    scores = [scorer.score(t, p)["rouge1"] for t, p in zip(targets, predictions)]
    return {"title_rouge1_recall": float(np.mean([s.recall for s in scores])),
            "title_rouge1_f1": float(np.mean([s.fmeasure for s in scores]))}


def yes_probability(predictions: Sequence[str], scores: Sequence[float]) -> np.ndarray:
    """The model's P(yes) for image-text matching posed as generating "yes" or "no".

    `scores` is the log-probability of each decoded sequence: a decoded "yes" has P(yes) = exp(score);
    any other output gets 1 - exp(score), which is P(yes) exactly when the model splits its mass
    between "yes" and "no", and an upper bound otherwise.
    """
    _check_lengths(predictions=predictions, scores=scores)
    said_yes = np.array([_normalize(p) == "yes" for p in predictions])
    p = np.exp(np.asarray(scores, np.float64))
    return np.where(said_yes, p, 1.0 - p)


def matching_metrics(targets: Sequence[str], predictions: Sequence[str],
                     aux_values: Mapping[str, Sequence[float]],
                     precision: float = 0.9) -> dict[str, float]:
    """Image-text matching (MMT4 sec. 4.4, Table 4): accuracy, ROC-AUC, PR-AUC, recall at precision.

    Targets are "yes" (the title describes the image: the positive class) or "no". ROC-AUC, PR-AUC
    (average precision) and recall at `precision` rank examples by `yes_probability`; recall is over
    the "yes" targets, as in Table 4's R@0.90. They are nan when the targets hold a single class.
    """
    _check_precision(precision)
    labels = [_normalize(t) for t in targets]
    if unknown := set(labels) - {"yes", "no"}:
        raise ValueError(f"Matching targets must be 'yes' or 'no'; got {sorted(unknown)}.")
    labels = np.array([t == "yes" for t in labels])
    p_yes = yes_probability(predictions, _scores(aux_values))
    _check_lengths(targets=targets, scores=p_yes)
    said_yes = np.array([_normalize(p) == "yes" for p in predictions])
    return ({"match_accuracy": float(np.mean(said_yes == labels))}
            | ranking_metrics(labels, p_yes, precision))


def ranking_metrics(labels: Sequence[bool], scores: Sequence[float],
                    precision: float = 0.9) -> dict[str, float]:
    """How well `scores` rank the positive `labels` first: `match_roc_auc`, `match_pr_auc` (average
    precision) and `match_recall_at_precision_<p>` (nan when the labels hold a single class).
    Generative matching ranks by P(yes); the contrastive head by the pair's cosine."""
    _check_precision(precision)
    labels = np.asarray(labels, bool)
    _check_lengths(labels=labels, scores=scores)
    recall_key = f"match_recall_at_precision_{precision:g}"
    if labels.all() or not labels.any():
        return {"match_roc_auc": np.nan, "match_pr_auc": np.nan, recall_key: np.nan}
    curve_precision, curve_recall, _ = skm.precision_recall_curve(labels, scores)
    return {"match_roc_auc": float(skm.roc_auc_score(labels, scores)),
            "match_pr_auc": float(skm.average_precision_score(labels, scores)),
            recall_key: float(curve_recall[curve_precision >= precision].max())}
