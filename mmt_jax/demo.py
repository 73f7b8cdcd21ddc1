"""The README's main job and its multitask variant on the embedded catalog.

    mmt-jax demo                   # Table 2's shape: MMT4 against the text-only T5
    mmt-jax demo --job multitask   # MMT4 with the contrastive head on every task in one run
    mmt-jax demo --job moemoe      # MoEMoE and its Fig. 5 ablations beside table2's T5 and MMT4

Both:
1. Generate the embedded catalog (3000 garment-like products) under `workdir/tfds`, with each
   image's EfficientNet-Lite0 features at 128 px (ImageNet weights, frozen: a 4x4 map of 1280-d
   vectors plus each cell's pixels, `vision/extractors.py`), computed once there.
2. Pretrain a tiny MMT4 (T5.1.1 tiny reading those 32 stored vectors, `models/mmt4_tiny_lite0.gin`)
   for 300 steps on span corruption + MLM (`mmt_jax/gin/runs/catalog.gin`; table2 also on the title
   from the image, `pretrain_titles`).
3. Fine-tune it from its pretrained checkpoint (`pretrain_steps=0`: from scratch, no step 2; the
   attribute prompt is the title followed by the description, every attribute value removed from
   the titles) and decode the validation products.

`table2` also pretrains and fine-tunes the same T5 without the image branch on the same text, fine-
tunes both on the attribute tasks alone (`attributes_removed100`, colour at 3 times the others'
rate: 22 values told apart by the image alone), AdamW at 1e-3 with a 100-step warm-up in every run,
and prints, per attribute, T5's and MMT4's accuracy: colour, pattern and sleeve type are only in the
image, brand and material in the description, so MMT4 should win on the first three and tie on the
other two.

`multitask` is the recipe of README "Training that does not collapse": MMT4 with the contrastive
head (`runs/contrastive.gin`) in both runs, AdamW at 6.7e-4 with a 100-step warm-up, fine-tuned
on the attributes (every one at the same rate), title generation and image-text matching at once
(`multitask_removed100`); it prints
the attribute accuracies, matching by generation and by the head (ROC-AUC, PR-AUC, pairs/s),
image -> title retrieval (recall@1, @10) and title ROUGE-1 on validation beside training products.

`moemoe` is the MoEMoE paper's comparison on the same data and recipe as `table2` (whose T5 and
MMT4 runs it shares, training them only when the workdir lacks them): MoEMoE tiny
(`models/moemoe_tiny_lite0.gin`) starts from T5's pretraining (both text encoders and the decoder,
the experts upcycled) and is fine-tuned on `qa_removed100`, as are its Fig. 5 ablations, each
changing one switch: without question guidance (WoQG), without the alignment losses (WoAL), one
joint encoder (S-Enc). It prints accuracy and recall at 90% precision per attribute for every
model, and each MoEMoE's mean image share of the source weights.

Every step is the train binary's run (`train.train` configured by the run's gin files through
`gin_config`, as `mmt-jax train` does), so the commands it prints are the ones to run by hand.
"""
import dataclasses
import inspect
import json
import os
import shlex
import time

import jax

from mmt_jax import gin_config, metrics, retrieval, task_inference, tasks, train
from mmt_jax.checkpoints import store

IMAGE_ATTRIBUTES = ("color", "pattern", "sleeve_type")


@dataclasses.dataclass(frozen=True)
class Contender:
    """A model the jobs train and compare.

    model_file: its gin model file.
    text_only: trained and evaluated on the tasks' text-only twins (`<task>_text`).
    qa: fine-tuned and evaluated on MoEMoE's `P_qa` tasks (question, context and image apart)
      instead of the job's attribute tasks.
    pretrained_by: the contender whose pretraining it starts from (its own pretraining: none).
    bindings: gin bindings of its fine-tuning (an ablation's switch).
    """
    model_file: str
    text_only: bool = False
    qa: bool = False
    pretrained_by: str | None = None
    bindings: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        return "_text" if self.text_only else ""


_MOEMOE = "models/moemoe_tiny_lite0.gin"
CONTENDERS = {
    "T5": Contender("models/t5_tiny_catalog.gin", text_only=True),
    "MMT4": Contender("models/mmt4_tiny_lite0.gin"),
    "MoEMoE": Contender(_MOEMOE, qa=True, pretrained_by="T5"),
    # Fig. 5 of the MoEMoE paper: each changes one switch of MoEMoE
    "WoQG": Contender(_MOEMOE, qa=True, pretrained_by="T5",
                      bindings=('moemoe.MultiSourceConfig.source_weighting="uniform"',)),
    "WoAL": Contender(_MOEMOE, qa=True, pretrained_by="T5",
                      bindings=("moemoe.MultiSourceConfig.question_context_weight=0.0",
                                "moemoe.MultiSourceConfig.question_image_weight=0.0")),
    "S-Enc": Contender(_MOEMOE, qa=True, pretrained_by="T5",  # no question encoding to weigh by
                       bindings=("moemoe.MultiSourceConfig.joint_encoder=True",
                                 'moemoe.MultiSourceConfig.source_weighting="uniform"')),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One variant of the main job: what it fine-tunes, and how.

    models: which of `CONTENDERS` it trains, in order (one a model starts from comes before it).
    finetune_task: the catalog task or mixture the attribute models fine-tune on (T5: its `_text`
      twin; MoEMoE: `qa_removed100`).
    lengths: the fine-tuning TASK_FEATURE_LENGTHS (and of the decoded evaluation).
    contrastive: MMT4 gets the contrastive head (`runs/contrastive.gin`) in both runs.
    learning_rate: AdamW's peak rate in both runs (`run`'s default).
    warmup_steps: AdamW's linear warm-up, then linear decay.
    finetune_steps: fine-tuning steps.
    attribute_rates: `{attribute: rate}` in the fine-tuning mixture, others 1
      (`tasks.catalog_task.attribute_rates`).
    pretrain_task: the pretraining task (T5: its `_text` twin).
    image_text: also report MMT4's matching, retrieval and titles.
    recall: also report recall at 90% precision and MoEMoE's image share of the source weights.
    runs: the model directories' suffix under the workdir (`mmt4<runs>`, `mmt4<runs>_pretrain`), so
      the jobs share one workdir and its catalog, and of the task prefix (`demo<runs>`), so both
      jobs can run in one process with their own mixing rates.
    """
    models: tuple[str, ...]
    finetune_task: str
    lengths: dict
    contrastive: bool
    learning_rate: float
    warmup_steps: int
    finetune_steps: int
    image_text: bool
    attribute_rates: dict = dataclasses.field(default_factory=dict)
    pretrain_task: str = "pretrain"
    recall: bool = False
    runs: str = ""


TABLE2 = Job(("T5", "MMT4"), "attributes_removed100", {"inputs": 64, "targets": 8},
             contrastive=False, learning_rate=1e-3, warmup_steps=100, finetune_steps=1000,
             image_text=False, attribute_rates={"color": 3.0}, pretrain_task="pretrain_titles")
# Titles are at most 18 catalog tokens: the multitask job's targets and paired texts take 20.
JOBS = {
    "table2": TABLE2,
    "multitask": Job(("MMT4",), "multitask_removed100",
                     {"inputs": 64, "targets": 20, "pair_text": 20},
                     contrastive=True, learning_rate=6.7e-4, warmup_steps=100,
                     finetune_steps=1400, image_text=True,
                     runs="_multitask"),
    # table2's recipe and model directories, so its T5 and MMT4 are reused
    "moemoe": dataclasses.replace(TABLE2, models=tuple(CONTENDERS), recall=True),
}
COLLAPSE_CHECK_STEPS = inspect.signature(train.train).parameters["collapse_check_steps"].default


def _train(gin_files: list[str], bindings: list[str]) -> None:
    """One training run, printed as the `mmt-jax train` command that does the same."""
    print("$ mmt-jax train " + " ".join(shlex.quote(a) for a in
                                        [f"--gin_file={f}" for f in gin_files]
                                        + [f"--gin.{b}" for b in bindings]), flush=True)
    result = gin_config.run_configured(train.train, gin_files, bindings)
    print(f"finished at step {result.step}: loss {result.train_metrics['loss']:.4f}"
          if "loss" in result.train_metrics else
          f"already trained to step {result.step} (its model directory had that checkpoint)",
          flush=True)


def run(workdir: str = "runs/demo", job: str = "table2", pretrain_steps: int = 300,
        finetune_steps: int | None = None, num_products: int = 3000,
        image_features: str = "efficientnet-lite0+pixels-px128", batch_size: int = 32,
        learning_rate: float | None = None, examples: int = 6,
        models: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    """Runs `JOBS[job]` with AdamW at `learning_rate` for every run (it, `finetune_steps` and
    `models`, a subset of the job's in its order, the job's own by default); returns {model: {attribute: accuracy}}, for a job with `recall` also
    {"<model> recall@P90": {attribute: recall}} and {"<MoEMoE> image share": {attribute: share}},
    and for a job with `image_text` {"MMT4 image-text": matching, retrieval and title figures}."""
    start = time.time()
    spec = JOBS[job]
    if models is not None:
        unknown = set(models) - set(spec.models)
        if unknown:
            raise ValueError(f"models {sorted(unknown)} are not in job {job!r}: {spec.models}")
        spec = dataclasses.replace(spec, models=tuple(m for m in spec.models if m in models))
    finetune_steps = spec.finetune_steps if finetune_steps is None else finetune_steps
    learning_rate = spec.learning_rate if learning_rate is None else learning_rate
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "tfds")
    catalog = f"embedded-n{num_products}-s0-px128-{image_features}"
    prefix = "demo" + spec.runs
    # One catalog and one task registration for both models: T5's text-only twins of the tasks
    # drop the stored features, MMT4's read them.
    common = [f'IMAGE_FEATURES="{image_features}"', f'DATA_DIR="{data_dir}"',
              f'CATALOG="{catalog}"', f"BATCH_SIZE={batch_size}",
              f"LEARNING_RATE={learning_rate:g}", f"WARMUP_STEPS={spec.warmup_steps}",
              "tasks.catalog_task.with_description=True", f'CATALOG_PREFIX="{prefix}"',
              *([f"tasks.catalog_task.attribute_rates={json.dumps(spec.attribute_rates)}"]
                if spec.attribute_rates else []),
              "train.train.log_period=100", "train.train.checkpoint_period=100000"]
    for name in spec.models:
        contender = CONTENDERS[name]
        contrastive = spec.contrastive and name == "MMT4"
        gin_files = ["runs/catalog.gin", contender.model_file,
                     *(["runs/contrastive.gin"] if contrastive else []), "runs/lite0_features.gin"]
        pair = {"pair_text": spec.lengths["pair_text"]} if contrastive else {}
        lengths = {k: v for k, v in spec.lengths.items() if k != "pair_text"} | pair
        start_from = []
        if pretrain_steps:
            pretrained = contender.pretrained_by or name
            pretrain_dir = os.path.join(workdir, f"{pretrained.lower()}{spec.runs}_pretrain")
            if contender.pretrained_by is None:
                _train(gin_files, [f'MODEL_DIR="{pretrain_dir}"', f"TRAIN_STEPS={pretrain_steps}",
                                   f'TASK="{spec.pretrain_task}{contender.suffix}"',
                                   "TASK_FEATURE_LENGTHS=" + json.dumps(
                                       {"inputs": 48, "targets": 48, **pair}), *common])
            start_from = [f'INITIAL_CHECKPOINT_PATH="{pretrain_dir}/checkpoint_{pretrain_steps}"']
        # The multitask job evaluates once at the end, so the collapse check (from its first
        # step on) names any task that has not learned from its inputs.
        checks = ([f"train.train.eval_period={finetune_steps}"]
                  if spec.image_text and finetune_steps >= COLLAPSE_CHECK_STEPS else [])
        task = "qa_removed100" if contender.qa else spec.finetune_task + contender.suffix
        _train(gin_files, [f'MODEL_DIR="{_model_dir(workdir, name, spec)}"',
                           f"TRAIN_STEPS={finetune_steps}", f'TASK="{task}"', *start_from,
                           f"TASK_FEATURE_LENGTHS={json.dumps(lengths)}", *common, *checks,
                           *contender.bindings])

    attributes = tasks.DEFAULT_ATTRIBUTES
    accuracy, recall, rows, share = {}, {}, {}, {}
    lengths = {k: v for k, v in spec.lengths.items() if k != "pair_text"}
    for name in spec.models:
        contender = CONTENDERS[name]
        model, params = _load(os.path.join(_model_dir(workdir, name, spec),
                                           f"checkpoint_{finetune_steps}"))
        accuracy[name], recall[name], share[name] = {}, {}, {}
        for attribute in attributes:
            task = (f"{prefix}_qa_{attribute}_removed100" if contender.qa
                    else f"{prefix}_{attribute}_removed100{contender.suffix}")
            predictions = task_inference.predict_task(model, params, task, "validation", lengths,
                                                      64)
            scores = task_inference.evaluate_task(task, predictions)
            accuracy[name][attribute] = scores["attribute_accuracy"]
            recall[name][attribute] = scores["attribute_recall_at_precision_0.9"]
            rows[name, attribute] = predictions
            if predictions[0].source_weights is not None:
                share[name][attribute] = _image_share(predictions)
    _print_table(accuracy, attributes)
    _print_examples(rows, attributes, examples)
    if spec.recall:
        _print_table(recall, attributes, "Recall at 90% precision", "R@P90")
        shares = {name: values for name, values in share.items() if values}
        _print_table(shares, attributes, "Image share of the mean source weights, |alpha| / "
                     "(|alpha| + |beta|) (Eq. 4)", "image share", "{:.2f}")
        accuracy |= {f"{name} recall@P90": values for name, values in recall.items()}
        accuracy |= {f"{name} image share": values for name, values in shares.items()}
    if spec.image_text:
        accuracy["MMT4 image-text"] = _image_text_report(
            *_load(os.path.join(workdir, "mmt4" + spec.runs, f"checkpoint_{finetune_steps}")),
            spec.lengths, prefix)
    print(f"\nmain job finished in {(time.time() - start) / 60:.1f} min; checkpoints under {workdir}")
    return accuracy


def _model_dir(workdir: str, name: str, spec: Job) -> str:
    return os.path.join(workdir, name.lower().replace("-", "_") + spec.runs)


def _image_share(predictions) -> float:
    """The image's share `|mean alpha| / sum over sources of |mean weight|` of MoEMoE's signed,
    unnormalised source weights (Eq. 4), averaged over `predictions`."""
    means = {source: abs(sum(p.source_weights[source] for p in predictions) / len(predictions))
             for source in predictions[0].source_weights}
    return means["image"] / max(sum(means.values()), 1e-9)


def _load(checkpoint: str):
    config, params = store.load_checkpoint(checkpoint)
    return task_inference.build_model(config), jax.device_put(params)


def _timed(fn, *args, **kwargs):
    """`(fn(...), seconds)`, after one call on a single batch to compile it."""
    fn(*args, **{**kwargs, "max_examples": 1})
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _image_text_report(model, params, pair_lengths, prefix: str,
                       batch_size: int = 64) -> dict[str, float]:
    """MMT4's matching (generative and by the contrastive head), retrieval and title figures on the
    validation split of the tasks `<prefix>_match` and `<prefix>_title`, printed as tables; returns
    them."""
    match, title = f"{prefix}_match", f"{prefix}_title"
    report = {}
    lengths = {k: v for k, v in pair_lengths.items() if k != "pair_text"}
    answers, seconds = _timed(task_inference.predict_task, model, params, match,
                              "validation", lengths, batch_size)
    generative = task_inference.evaluate_task(match, answers)
    pairs, head_seconds = _timed(retrieval.embed_task, model, params, match, "validation",
                                 pair_lengths, batch_size)
    head = metrics.ranking_metrics(pairs.labels > 0, pairs.cosines())
    print(f"\nImage-text matching, {len(answers)} validation pairs (half of them true; the text-only "
          "T5 cannot match: 0.5):\n")
    print("| MMT4 scorer | ROC-AUC | PR-AUC | pairs/s |\n|---|---:|---:|---:|")
    for label, result, time_taken in (("generative (decodes yes/no)", generative, seconds),
                                      ("contrastive head (cosine)", head, head_seconds)):
        print(f"| {label} | {result['match_roc_auc']:.3f} | {result['match_pr_auc']:.3f} | "
              f"{len(answers) / time_taken:.0f} |")
        key = "generative" if label.startswith("generative") else "head"
        report |= {f"match_{key}_roc_auc": result["match_roc_auc"],
                   f"match_{key}_pr_auc": result["match_pr_auc"],
                   f"match_{key}_pairs_per_second": len(answers) / time_taken}
    products = retrieval.embed_task(model, params, title, "validation", pair_lengths,
                                    batch_size)
    recall = retrieval.recall_at_k(products)
    print(f"\nImage -> title retrieval by the contrastive head among the "
          f"{recall['retrieval_candidates']:.0f} distinct validation titles: recall@1 "
          f"{recall['recall@1']:.3f}, recall@10 {recall['recall@10']:.3f}")
    report |= {k: v for k, v in recall.items() if k.startswith("recall")}
    rouge, titles = {}, {}
    for split in ("validation", "train"):
        titles[split] = task_inference.predict_task(model, params, title, split, lengths,
                                                    batch_size, max_examples=len(products.text))
        rouge[split] = task_inference.evaluate_task(
            title, titles[split])["title_rouge1_recall"]
    example = titles["validation"][0]
    print(f"Title generation from the image, ROUGE-1 recall: validation {rouge['validation']:.3f}, "
          f"training products {rouge['train']:.3f} (first {len(products.text)}); e.g. "
          f"{example.target!r} -> {example.prediction!r}")
    return report | {"title_rouge1_recall_validation": rouge["validation"],
                     "title_rouge1_recall_train": rouge["train"]}


def _print_table(values, attributes, title: str = "Attribute generation",
                 measure: str = "accuracy", form: str = "{:.1%}") -> None:
    print(f"\n{title}, every attribute value removed from the titles (validation split)"
          "\n(cf. Table 2 of the MMT4 paper, row '100%'):\n")
    print("| attribute | " + " | ".join(f"{name} {measure}" for name in values) + " | only in |\n"
          + "|---|" + "---:|" * len(values) + "---|")
    for attribute in attributes:
        where = "image" if attribute in IMAGE_ATTRIBUTES else "text"
        print(f"| {attribute} | " + " | ".join(form.format(scores[attribute])
                                               for scores in values.values()) + f" | {where} |")


def _print_examples(rows, attributes, count) -> None:
    names = sorted({name for name, _ in rows}, key=list(CONTENDERS).index)
    print("\nExamples (title as the model saw it -> reference | " + " | ".join(names) + "):")
    for i in range(count):
        attribute = attributes[i % len(attributes)]
        shown = rows[names[0], attribute][i]
        print(f"  {shown.inputs!r} -> {shown.target!r} | "
              + " | ".join(repr(rows[name, attribute][i].prediction) for name in names))
