"""Signs that a task is not learning, said out loud (issue 19): a loss that sits at the label prior's
entropy, and predictions that are all the same.

A task whose references come from a small set of answers (an attribute's values, matching's yes/no)
has a floor that needs no input at all: predicting each answer with its frequency p_a costs, per
example, the entropy of those frequencies,

    H = - sum_a p_a ln p_a          (nats; ln 2 = 0.693 for a balanced yes/no)

A model whose held-out loss per example stays at or above H has learned the answer frequencies and
nothing of the inputs (issue 19: matching at learning rate 2e-3 sat at ln 2 for 2000 steps while
nothing said so). `prior_check` compares the two on held-out examples (`task_inference.
score_batches`); the train binary calls it at every evaluation after `collapse_check_steps`.
`constant_predictions_warning` flags a decoded task whose predictions are all one string (the eval
binary's report and the train binary's inference evaluation).
"""
import collections
import math
from typing import Sequence

# A task with more distinct answers than this among the checked examples (titles) has no useful
# prior to compare with: its entropy is about ln(examples).
MAX_ANSWERS = 32
# "At the prior": the loss has come down by less than this fraction of the entropy.
PRIOR_TOLERANCE = 0.05


def label_prior_entropy(targets: Sequence[str]) -> float | None:
    """The entropy (nats) of the references' empirical distribution, or None when they do not form a
    small answer set (fewer than 2 examples, one answer only, or more than `MAX_ANSWERS`)."""
    counts = collections.Counter(targets)
    if len(targets) < 2 or not 2 <= len(counts) <= MAX_ANSWERS:
        return None
    n = len(targets)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def prior_check(task_name: str, scored: Sequence[tuple[str, float]],
                step: int) -> tuple[float, float, str | None] | None:
    """`(mean loss per example, label-prior entropy, warning or None)` of `scored` (`(reference,
    loss)` pairs); the warning when the loss is within `PRIOR_TOLERANCE` of the entropy or above.
    None when the references do not form a small answer set (no prior to compare with)."""
    entropy = label_prior_entropy([target for target, _ in scored])
    if entropy is None:
        return None
    loss = sum(loss for _, loss in scored) / len(scored)
    if loss < (1 - PRIOR_TOLERANCE) * entropy:
        return loss, entropy, None
    answers = len({target for target, _ in scored})
    return loss, entropy, (
        f"task {task_name} has not learned from its inputs by step {step}: its held-out loss "
        f"is {loss:.3f} nats per example, the entropy of its {answers} answers' frequencies is "
        f"{entropy:.3f} (a model that ignores the inputs reaches that); train with Adafactor "
        "(--gin_file=runs/adafactor.gin), or a lower learning rate or a warm-up (README: "
        "Training that does not collapse)")


def constant_predictions_warning(task_name: str, predictions: Sequence[str]) -> str | None:
    """A warning when every one of at least two predictions is the same string; None otherwise."""
    if len(predictions) < 2 or len(set(predictions)) > 1:
        return None
    return f"task {task_name}: all {len(predictions)} predictions are {predictions[0]!r}"
