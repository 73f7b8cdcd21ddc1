"""The eval binary: a checkpoint's task metrics, written as a report with predictions and plots.

    mmt-jax eval --gin_file=runs/eval.gin --gin_file=runs/lite0_features.gin \
        --gin.CHECKPOINT_PATH=\"runs/demo/mmt4\" --gin.DATA_DIR=\"runs/demo/tfds\" \
        --gin.tasks.catalog_task.with_description=True --gin.TASK=\"attributes_removed100\" \
        --gin.EVAL_OUTPUT_DIR=\"runs/demo/eval\"

writes `report.json` (every task's metrics, a warning for a task whose predictions are all the
same, and for MoEMoE each task's mean source weights), `predictions/<task>.jsonl` and the plots of
`eval_plots.py` into the output directory. Decoding and scoring are `task_inference`'s.
"""
import dataclasses
import functools
import json
import os
import sys
from typing import Mapping

import jax
import seqio

from mmt_jax import acceptance, eval_plots, task_health
from mmt_jax import tasks as catalog_tasks
from mmt_jax.checkpoints import store
from mmt_jax.errors import InputError
from mmt_jax.task_inference import (build_model, evaluate_task, get_task, leaf_tasks,
                                    predict_task)


def evaluate(*, checkpoint_path: str, mixture_or_task_name: str, output_dir: str,
             task_feature_lengths: Mapping[str, int], split: str = "validation",
             batch_size: int = 32, max_examples: int | None = None,
             closed_set: bool = True) -> dict:
    """The eval binary: every task of `mixture_or_task_name` on a checkpoint (or a model_dir's newest
    one) -> `output_dir/report.json`, per-task predictions and plots. Returns the report.

    `closed_set`: each attribute task is also decoded with its answers restricted to the values its
    catalog's training split gives the attribute (`value_trie.py`), its metrics reported as
    `closed_<metric>` beside the open ones, and its predictions as `closed_prediction`.

    Each attribute prompt gets its acceptance threshold at 90% precision for each decoding
    (`acceptance.py`), in the report's `acceptance` and, on the validation split, in the
    checkpoint's `acceptance.json`, which infer reads."""
    get_task(mixture_or_task_name)  # an unknown name fails here, naming the close ones
    tasks = leaf_tasks(mixture_or_task_name)
    if not tasks:
        raise InputError(f"{mixture_or_task_name!r} has no task with inference metrics to evaluate")
    path = store.resolve(checkpoint_path)
    config, params = store.load_checkpoint(path)
    catalog_tasks.check_text_sources(mixture_or_task_name, config.text_sources)
    for task in tasks:
        _check_image_preprocessing(task, config, path)
    model = build_model(config)
    params = jax.device_put(params)
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
    report = {"checkpoint": path, "split": split, "output_dir": os.path.abspath(output_dir),
              "tasks": {}}
    rows = {}
    calibration = {decoding: {} for decoding in acceptance.DECODINGS}  # prompt -> decoded rows
    for task in tasks:
        rows[task.name] = predict_task(model, params, task.name, split, task_feature_lengths,
                                       batch_size, max_examples)
        metrics = evaluate_task(task.name, rows[task.name])
        values = catalog_tasks.attribute_values(task.name)  # None: not an attribute task
        closed = None if not (closed_set and values) else predict_task(
            model, params, task.name, split, task_feature_lengths, batch_size, max_examples,
            values=values)
        if closed is not None:
            metrics |= {f"closed_{k}": v for k, v in evaluate_task(task.name, closed).items()}
        if values is not None:
            prompt = catalog_tasks.task_prompts(task.name)[0]
            for decoding, decoded in zip(acceptance.DECODINGS, (rows[task.name], closed)):
                if decoded is not None:
                    calibration[decoding].setdefault(prompt, []).extend(decoded)
        constant = task_health.constant_predictions_warning(
            task.name, [row.prediction for row in rows[task.name]])
        report["tasks"][task.name] = {"num_examples": len(rows[task.name]), "metrics": metrics,
                                      "warnings": [constant] if constant else []}
        weights = mean_source_weights(rows[task.name])
        if weights:  # MoEMoE: where its answers came from
            report["tasks"][task.name]["mean_source_weights"] = weights
        with open(os.path.join(output_dir, "predictions", f"{task.name}.jsonl"), "w") as f:
            for i, row in enumerate(rows[task.name]):
                fields = dataclasses.asdict(row)
                if closed is not None:
                    fields |= {"closed_prediction": closed[i].prediction,
                               "closed_score": closed[i].score}
                f.write(json.dumps(fields, ensure_ascii=False) + "\n")
        print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if constant:
            print(f"warning: {constant}", file=sys.stderr, flush=True)
    if any(calibration.values()):
        report["acceptance"] = _calibrate(calibration, path if split == "validation" else None,
                                          split)
    report["plots"] = eval_plots.write_plots(report, rows, output_dir)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    return report


def _calibrate(calibration: Mapping[str, Mapping[str, list]], checkpoint: str | None,
               split: str) -> dict:
    """Each prompt's acceptance threshold at `acceptance.PRECISION` per decoding, and the share of
    its predictions it accepts; written beside `checkpoint` (validation only), for infer."""
    thresholds, shares = {}, {}
    for decoding, by_prompt in calibration.items():
        for prompt, decoded in by_prompt.items():
            threshold = acceptance.pick_threshold([r.target for r in decoded],
                                                  [r.prediction for r in decoded],
                                                  [r.score for r in decoded])
            thresholds.setdefault(decoding, {})[prompt] = threshold
            shares.setdefault(decoding, {})[prompt] = sum(
                acceptance.passes(threshold, r.score) for r in decoded) / len(decoded)
    report = {"precision": acceptance.PRECISION, "thresholds": thresholds,
              "accepted_share": shares}
    if checkpoint is not None:
        report["file"] = acceptance.save(checkpoint, thresholds, split)
    return report


def mean_source_weights(rows) -> dict[str, float]:
    """MoEMoE's mean weight of each source over a task's predictions; {} for other models."""
    weights = [row.source_weights for row in rows if row.source_weights]
    return {source: sum(w[source] for w in weights) / len(weights)
            for source in weights[0]} if weights else {}


def _check_image_preprocessing(task: seqio.Task, config, checkpoint: str) -> None:
    """A task that decodes images differently from the checkpoint's training would score a model on
    inputs it never saw (e.g. 224 px images for a 64 px model): refuse, saying what to set."""
    used = [p.keywords["options"] for p in task.preprocessors
            if isinstance(p, functools.partial) and "options" in p.keywords]
    if config.image_branch is None or config.image is None or not used:
        return
    if dataclasses.replace(used[0], augment=False) != dataclasses.replace(config.image, augment=False):
        raise InputError(f"task {task.name} preprocesses images as {used[0]}, but {checkpoint} was "
                         f"trained with {config.image}; set the task's image (gin: IMAGE_SIZE=...) "
                         "to match")
