"""Calibrated acceptance: fill in an attribute only where the model is sure enough.

For each prompt ("color:"), `mmt-jax eval` picks the score threshold at which the predictions
scoring at least that much are right 90% of the time on the validation split (the papers' R@P90
operating point, `metrics.threshold_at_precision`) and stores the thresholds beside the checkpoint,
in `acceptance.json`:

    {"precision": 0.9, "split": "validation",
     "thresholds": {"open": {"color:": -0.41, ...}, "closed": {"color:": -0.37, ...}}}

one set per decoding ("open", or "closed" to the training values: `value_trie.py`); a threshold of
null means no threshold reached the precision, so nothing is accepted for that prompt. `mmt-jax
infer` marks each prediction `accepted` against the threshold of its prompt and decoding, and
reports the accepted share per prompt. The file is written after the checkpoint was sealed
(`checkpoints/digests.py` leaves later files alone), atomically, and replaced by each evaluation.
"""
import json
import os
from typing import Mapping, Sequence

from mmt_jax import metrics

FILE = "acceptance.json"
PRECISION = 0.9
DECODINGS = ("open", "closed")


def pick_threshold(targets: Sequence[str], predictions: Sequence[str], scores: Sequence[float],
                   precision: float = PRECISION) -> float | None:
    """The lowest score threshold whose accepted predictions (score >= it) are exact matches at
    `precision` or better, keeping the most right answers; None when none is."""
    return metrics.threshold_at_precision(metrics.exact_match(targets, predictions), scores,
                                          precision)[0]


def save(checkpoint: str, thresholds: Mapping[str, Mapping[str, float | None]], split: str,
         precision: float = PRECISION) -> str:
    """Writes `{decoding: {prompt: threshold}}` beside `checkpoint` (merged over an earlier file's
    prompts, so evaluating one task keeps the others'); returns the file's path."""
    unknown = set(thresholds) - set(DECODINGS)
    if unknown:
        raise ValueError(f"decodings {sorted(unknown)}; choose from {DECODINGS}")
    earlier = load(checkpoint) or {}
    merged = {d: {**earlier.get("thresholds", {}).get(d, {}), **thresholds.get(d, {})}
              for d in DECODINGS}
    path = os.path.join(checkpoint, FILE)
    temporary = os.path.join(checkpoint, f".{FILE}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"precision": precision, "split": split, "thresholds": merged}, f, indent=1)
    os.replace(temporary, path)
    return path


def load(checkpoint: str) -> dict | None:
    """The checkpoint's `acceptance.json`, or None when it has none (never evaluated)."""
    path = os.path.join(checkpoint, FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def passes(threshold: float | None, score: float) -> bool:
    """Whether a prediction scoring `score` reaches `threshold` (None: nothing reached the
    precision, so nothing does)."""
    return threshold is not None and score >= threshold


def accepted(thresholds: Mapping[str, float | None] | None, prompt: str,
             score: float) -> bool | None:
    """Whether a prediction for `prompt` scoring `score` is accepted: None when the prompt has no
    calibrated threshold (no `acceptance.json`, or a prompt not evaluated)."""
    if thresholds is None or prompt not in thresholds:
        return None
    return passes(thresholds[prompt], score)
