"""Inference evaluation: decode a task's examples with a model and score them with the task's metrics.

`predict_task` runs greedy (or the model's) decoding over one split of one seqio task and returns a
row per example (the text it saw, the reference, the prediction and its score); `evaluate_task`
applies the task's own metric functions (`mmt_jax/metrics.py`) to those rows. The eval binary, the
trainer's periodic inference evaluation and the README's main job all go through these two.
"""
import dataclasses
import functools
from typing import Mapping

import jax
import numpy as np
import seqio


@dataclasses.dataclass
class Prediction:
    inputs: str
    target: str
    prediction: str
    score: float


def predict_task(model, params, task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, max_examples: int | None = None) -> list[Prediction]:
    """Decodes `split` of `task_name` in order (no shuffling), `batch_size` examples per call."""
    task = seqio.get_mixture_or_task(task_name)
    examples = task.get_dataset(task_feature_lengths, split=split, shuffle=False, num_epochs=1)
    if max_examples is not None:
        examples = examples.take(max_examples)
    converter = model.FEATURE_CONVERTER_CLS(pack=False)
    batches = converter(examples, task_feature_lengths).batch(batch_size)
    predict = _compiled_predict(model)
    vocabulary = task.output_features["targets"].vocabulary
    rows = examples.as_numpy_iterator()
    results = []
    for batch in batches.as_numpy_iterator():
        n = len(batch["decoder_target_tokens"])
        padded = {k: _pad(v, batch_size) for k, v in batch.items()}  # one compiled shape
        tokens, aux = predict(params, padded)
        tokens, scores = np.asarray(tokens)[:n], np.asarray(aux["scores"])[:n]
        for decoded, score in zip(tokens, scores):
            row = next(rows)  # (not inside zip, which would draw one row too many per batch)
            results.append(Prediction(
                inputs=_text(row, "inputs"), target=_text(row, "targets"),
                prediction=vocabulary.decode(_until_eos(decoded, vocabulary.eos_id)),
                score=float(score)))
    return results


def evaluate_task(task_name: str, predictions: list[Prediction]) -> dict[str, float]:
    """The task's predict and predict-with-aux metric functions over `predictions`."""
    task = seqio.get_mixture_or_task(task_name)
    targets = [p.target for p in predictions]
    texts = [p.prediction for p in predictions]
    scores = {"scores": np.array([p.score for p in predictions])}
    results = {}
    for fn in task.predict_metric_fns:
        results.update(fn(targets, texts))
    for fn in task.predict_with_aux_metric_fns:
        results.update(fn(targets, texts, scores))
    return results


@functools.lru_cache(maxsize=8)
def _compiled_predict(model):
    """One jitted decoder per model, shared by all of its tasks (same batch shapes, one compile)."""
    return jax.jit(model.predict_batch_with_aux)


def _text(row: dict, feature: str) -> str:
    value = row.get(f"{feature}_pretokenized", b"")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    tokens = tokens.tolist()
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < size else x
