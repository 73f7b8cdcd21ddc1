"""The README's main job: MMT4 against the text-only T5 on the embedded catalog (Table 2's shape).

    mmt-jax demo                # about 12 minutes on 2 CPU cores

1. Generates the embedded catalog (3000 garment-like products) under `workdir/tfds`, with each
   image's EfficientNet-Lite0 features at 128 px (ImageNet weights, frozen: a 4x4 map of 1280-d
   vectors, `vision/extractors.py`), computed once there.
2. Pretrains a tiny MMT4 (T5.1.1 tiny reading those 16 stored vectors, `models/mmt4_tiny_lite0.gin`)
   for 300 steps on span corruption + MLM, and the same T5 without the image branch on the same text
   (`gin/runs/catalog.gin`).
3. Fine-tunes each from its pretrained checkpoint for 1000 steps on the attribute tasks with every
   attribute value removed from the titles (`attributes_removed100`, the text-only twin for T5); the
   prompt is the title followed by the description.
4. Decodes the validation products and prints, per attribute, T5's and MMT4's accuracy, plus a few
   predictions. Colour, pattern and sleeve type are then only in the image; brand and material are
   in the description: MMT4 should win on the first three and tie on the other two.

Every step is the train binary's run (`train.train` configured by the run's gin files through
`gin_config`, as `mmt-jax train` does), so the commands it prints are the ones to run by hand.
"""
import json
import os
import shlex
import time

import jax

from mmt_jax import gin_config, task_inference, tasks, train
from mmt_jax.checkpoints import store

IMAGE_ATTRIBUTES = ("color", "pattern", "sleeve_type")


def _train(gin_files: list[str], bindings: list[str]) -> None:
    """One training run, printed as the `mmt-jax train` command that does the same."""
    print("$ mmt-jax train " + " ".join(shlex.quote(a) for a in
                                        [f"--gin_file={f}" for f in gin_files]
                                        + [f"--gin.{b}" for b in bindings]), flush=True)
    result = gin_config.run_configured(train.train, gin_files, bindings)
    print(f"finished at step {result.step}: loss {result.train_metrics.get('loss', float('nan')):.4f}",
          flush=True)


def run(workdir: str = "runs/demo", pretrain_steps: int = 300, finetune_steps: int = 1000,
        num_products: int = 3000, image_features: str = "efficientnet-lite0+pixels-px128",
        batch_size: int = 32, examples: int = 6) -> dict[str, dict[str, float]]:
    """Runs the comparison; returns {model: {attribute: accuracy}}."""
    start = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "tfds")
    catalog = f"embedded-n{num_products}-s0-px128-{image_features}"
    # One catalog and one task registration for both models: T5's text-only twins of the tasks
    # drop the stored features, MMT4's read them.
    common = [f'IMAGE_FEATURES="{image_features}"', f'DATA_DIR="{data_dir}"',
              f'CATALOG="{catalog}"', f"BATCH_SIZE={batch_size}",
              "tasks.catalog_task.with_description=True", 'CATALOG_PREFIX="demo"',
              "train.train.log_period=100", "train.train.checkpoint_period=100000"]
    models = {"T5": ("models/t5_tiny_catalog.gin", "_text"),
              "MMT4": ("models/mmt4_tiny_lite0.gin", "")}
    lengths = {"inputs": 64, "targets": 8}
    for name, (model_gin, suffix) in models.items():
        gin_files = ["runs/catalog.gin", model_gin, "runs/lite0_features.gin"]
        pretrain_dir = os.path.join(workdir, f"{name.lower()}_pretrain")
        _train(gin_files, [f'MODEL_DIR="{pretrain_dir}"', f"TRAIN_STEPS={pretrain_steps}",
                           f'TASK="pretrain{suffix}"', "LEARNING_RATE=2e-3",
                           'TASK_FEATURE_LENGTHS={"inputs": 48, "targets": 48}', *common])
        _train(gin_files, [f'MODEL_DIR="{os.path.join(workdir, name.lower())}"',
                           f"TRAIN_STEPS={finetune_steps}",
                           f'TASK="attributes_removed100{suffix}"',
                           f'INITIAL_CHECKPOINT_PATH="{pretrain_dir}/checkpoint_{pretrain_steps}"',
                           "LEARNING_RATE=2e-3", f"TASK_FEATURE_LENGTHS={json.dumps(lengths)}",
                           *common])

    attributes = tasks.DEFAULT_ATTRIBUTES
    accuracy, rows = {}, {}
    for name, (_, suffix) in models.items():
        config, params = store.load_checkpoint(
            os.path.join(workdir, name.lower(), f"checkpoint_{finetune_steps}"))
        model = task_inference.build_model(config)
        params = jax.device_put(params)
        accuracy[name] = {}
        for attribute in attributes:
            task = f"demo_{attribute}_removed100{suffix}"
            predictions = task_inference.predict_task(model, params, task, "validation", lengths,
                                                      64)
            accuracy[name][attribute] = task_inference.evaluate_task(
                task, predictions)["attribute_accuracy"]
            rows[name, attribute] = predictions
    _print_table(accuracy, attributes)
    _print_examples(rows, attributes, examples)
    print(f"\nmain job finished in {(time.time() - start) / 60:.1f} min; checkpoints under {workdir}")
    return accuracy


def _print_table(accuracy, attributes) -> None:
    print("\nAttribute generation, every attribute value removed from the titles (validation split)"
          "\n(cf. Table 2 of the MMT4 paper, row '100%'):\n")
    print("| attribute | T5 accuracy | MMT4 accuracy | only in |\n|---|---:|---:|---|")
    for attribute in attributes:
        where = "image" if attribute in IMAGE_ATTRIBUTES else "text"
        print(f"| {attribute} | {accuracy['T5'][attribute]:.1%} | {accuracy['MMT4'][attribute]:.1%} "
              f"| {where} |")


def _print_examples(rows, attributes, count) -> None:
    print("\nExamples (title as the model saw it -> reference | T5 | MMT4):")
    for i in range(count):
        attribute = attributes[i % len(attributes)]
        t5, mmt4 = rows["T5", attribute][i], rows["MMT4", attribute][i]
        print(f"  {mmt4.inputs!r} -> {mmt4.target!r} | {t5.prediction!r} | {mmt4.prediction!r}")
