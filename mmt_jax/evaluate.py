"""Inference evaluation: decode a task's examples with a model and score them with the task's metrics.

`predict_task` runs greedy (or the model's) decoding over one split of one seqio task and returns a
row per example (the text it saw, the reference, the prediction and its score); `evaluate_task`
applies the task's own metric functions (`mmt_jax/metrics.py`) to those rows. The eval binary
(`evaluate`, below), the trainer's periodic inference evaluation and the README's main job all go
through these two.

    mmt-jax eval --gin_file=runs/eval.gin --gin_file=runs/lite0_features.gin \
        --gin.CHECKPOINT_PATH=\"runs/demo/mmt4\" --gin.DATA_DIR=\"runs/demo/tfds\" \
        --gin.tasks.catalog_task.with_description=True --gin.TASK=\"attributes_removed100\" \
        --gin.EVAL_OUTPUT_DIR=\"runs/demo/eval\"

writes `report.json` (every task's metrics), `predictions/<task>.jsonl` and the plots of
`eval_plots.py` into the output directory.
"""
import dataclasses
import functools
import json
import os
from typing import Mapping

import jax
import numpy as np
import seqio

from mmt_jax.errors import InputError


@dataclasses.dataclass
class Prediction:
    id: str
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
                id=_text(row, "id"), inputs=_text(row, "inputs"), target=_text(row, "targets"),
                prediction=vocabulary.decode(until_eos(decoded, vocabulary.eos_id)),
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
    value = row.get(f"{feature}_pretokenized", row.get(feature, b""))
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    tokens = tokens.tolist()
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < size else x


def leaf_tasks(mixture_or_task_name: str) -> list[seqio.Task]:
    """The tasks of a mixture (or the task itself) that have inference metrics."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return [t for t in tasks if t.predict_metric_fns or t.predict_with_aux_metric_fns]


def evaluate(*, checkpoint_path: str, mixture_or_task_name: str, output_dir: str,
             task_feature_lengths: Mapping[str, int], split: str = "validation",
             batch_size: int = 32, max_examples: int | None = None) -> dict:
    """The eval binary: every task of `mixture_or_task_name` on a checkpoint (or a model_dir's newest
    one) -> `output_dir/report.json`, per-task predictions and plots. Returns the report."""
    from mmt_jax import eval_plots
    from mmt_jax.train import build_model, get_task
    from mmt_jax.training import checkpoints
    get_task(mixture_or_task_name)  # an unknown name fails here, naming the close ones
    tasks = leaf_tasks(mixture_or_task_name)
    if not tasks:
        raise InputError(f"{mixture_or_task_name!r} has no task with inference metrics to evaluate")
    path = checkpoints.resolve(checkpoint_path)
    config, params = checkpoints.load_checkpoint(path)
    for task in tasks:
        _check_image_preprocessing(task, config, path)
    model = build_model(config)
    params = jax.device_put(params)
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
    report = {"checkpoint": path, "split": split, "output_dir": os.path.abspath(output_dir),
              "tasks": {}}
    rows = {}
    for task in tasks:
        rows[task.name] = predict_task(model, params, task.name, split, task_feature_lengths,
                                       batch_size, max_examples)
        metrics = evaluate_task(task.name, rows[task.name])
        report["tasks"][task.name] = {"num_examples": len(rows[task.name]), "metrics": metrics}
        with open(os.path.join(output_dir, "predictions", f"{task.name}.jsonl"), "w") as f:
            for row in rows[task.name]:
                f.write(json.dumps(dataclasses.asdict(row), ensure_ascii=False) + "\n")
        print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    report["plots"] = eval_plots.write_plots(report, rows, output_dir)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    return report


def _check_image_preprocessing(task: seqio.Task, config, checkpoint: str) -> None:
    """A task that decodes images differently from the checkpoint's training would score a model on
    inputs it never saw (e.g. 224 px images for a 64 px model): refuse, saying what to set."""
    used = [p.keywords["options"] for p in task.preprocessors
            if isinstance(p, functools.partial) and "options" in p.keywords]
    if config.fusion is None or config.image is None or not used:
        return
    if dataclasses.replace(used[0], augment=False) != dataclasses.replace(config.image, augment=False):
        raise InputError(f"task {task.name} preprocesses images as {used[0]}, but {checkpoint} was "
                         f"trained with {config.image}; set the task's image (gin: IMAGE_SIZE=...) "
                         "to match")
