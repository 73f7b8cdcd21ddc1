"""The eval binary's figures (PNG, matplotlib without a display).

- `attribute_accuracy.png`: one bar per attribute task, its `attribute_accuracy` (MMT4 Tables 1-2).
- `source_weights.png` (MoEMoE): per task, the mean weight of each source (image, context) in the
  fused encoding (Eq. 4-5 of the MoEMoE paper): which source its answers came from.
- per image-text matching task (MMT4 sec. 4.4): `<task>_roc.png` and `<task>_pr.png`, the ROC and
  precision-recall curves of P(yes) (`metrics.yes_probability`) with their areas, and
  `<task>_confusion.png`, decoded answer against reference.
"""
import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from mmt_jax import metrics  # noqa: E402


def write_plots(report: dict, rows: Mapping[str, list], output_dir: str) -> list[str]:
    """Writes every figure the report's tasks call for; returns the file names."""
    written = []
    accuracy = {name: task["metrics"]["attribute_accuracy"] for name, task in report["tasks"].items()
                if "attribute_accuracy" in task["metrics"]}
    if accuracy:
        written.append(_accuracy_bars(accuracy, output_dir))
    weights = {name: task["mean_source_weights"] for name, task in report["tasks"].items()
               if task.get("mean_source_weights")}
    if weights:
        written.append(_source_weight_bars(weights, output_dir))
    for name, task in report["tasks"].items():
        if "match_accuracy" in task["metrics"]:
            written += _matching(name, rows[name], output_dir)
    return written


def _save(fig, output_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, name), dpi=100)
    plt.close(fig)
    return name


def _accuracy_bars(accuracy: Mapping[str, float], output_dir: str) -> str:
    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    bars = ax.barh(names, [accuracy[n] for n in names], color="tab:blue")
    ax.bar_label(bars, labels=[f"{accuracy[n]:.1%}" for n in names], padding=3)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()
    ax.set_xlabel("attribute accuracy")
    return _save(fig, output_dir, "attribute_accuracy.png")


def _source_weight_bars(weights: Mapping[str, Mapping[str, float]], output_dir: str) -> str:
    names = list(weights)
    sources = list(next(iter(weights.values())))
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.2))
    height = 0.8 / len(sources)
    for i, source in enumerate(sources):
        values = [weights[n][source] for n in names]
        bars = ax.barh(np.arange(len(names)) + i * height, values, height, label=source)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
    ax.set_yticks(np.arange(len(names)) + height * (len(sources) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlabel("mean source weight (MoEMoE Eq. 4)")
    ax.legend()
    return _save(fig, output_dir, "source_weights.png")


def _matching(task: str, rows: list, output_dir: str) -> list[str]:
    labels = np.array([r.target.strip().lower() == "yes" for r in rows])
    answers = [r.prediction.strip().lower() for r in rows]
    p_yes = metrics.yes_probability(answers, [r.score for r in rows])
    written = []
    if labels.any() and not labels.all():  # curves need both classes
        fpr, tpr, _ = skm.roc_curve(labels, p_yes)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, label=f"AUC {skm.roc_auc_score(labels, p_yes):.3f}")
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task}: ROC")
        ax.legend(loc="lower right")
        written.append(_save(fig, output_dir, f"{task}_roc.png"))
        precision, recall, _ = skm.precision_recall_curve(labels, p_yes)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(recall, precision,
                label=f"AP {skm.average_precision_score(labels, p_yes):.3f}")
        ax.set(xlabel="recall", ylabel="precision", title=f"{task}: precision-recall",
               ylim=(0, 1.02))
        ax.legend(loc="lower left")
        written.append(_save(fig, output_dir, f"{task}_pr.png"))
    classes = ["yes", "no"]
    other = sorted(set(answers) - set(classes))
    truth = ["yes" if label else "no" for label in labels]
    said = [a if a in classes else "(other)" for a in answers]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        truth, said, labels=classes + (["(other)"] if other else []), ax=ax, colorbar=False)
    ax.set(xlabel="decoded answer", ylabel="reference", title=f"{task}: confusion")
    written.append(_save(fig, output_dir, f"{task}_confusion.png"))
    return written
