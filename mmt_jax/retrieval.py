"""Matching and retrieval with the contrastive head (`models/contrastive.py`): no decoding, one
encoder pass over each image and each text.

`embed_task` gives the head's unit vectors of every example's image and paired text over one split
of a task; their `cosines()` with the labels give the same ROC-AUC / PR-AUC that generative matching
reports (`metrics.ranking_metrics`); `recall_at_k` ranks every distinct text for every image
(image -> title retrieval among the split's products).
"""
import dataclasses
from typing import Mapping, Sequence

import numpy as np

from mmt_jax import task_inference


@dataclasses.dataclass
class PairEmbeddings:
    """One row per example: `images [N, D]` and `texts [N, D]` unit vectors, `labels [N]` (1: the
    text describes the image), `text [N]` the paired text as written."""
    images: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    text: list[str]

    def cosines(self) -> np.ndarray:
        """`[N]` the head's matching score of each example's own pair."""
        return np.sum(self.images * self.texts, axis=-1)


def embed_task(model, params, task_name: str, split: str, task_feature_lengths: Mapping[str, int],
               batch_size: int, max_examples: int | None = None) -> PairEmbeddings:
    """The head's vectors over `split` of `task_name`, in order (`Model.embed_pairs`; a model
    without the head raises its ValueError)."""
    embed = task_inference.compiled(model, "embed_pairs")
    images, texts, labels, text = [], [], [], []
    for rows, batch, n in task_inference.task_batches(model, task_name, split,
                                                       task_feature_lengths, batch_size,
                                                       max_examples):
        u, v, _ = embed(params, batch)
        images.append(np.asarray(u)[:n])
        texts.append(np.asarray(v)[:n])
        labels.append(np.asarray(batch["pair_label"])[:n])
        text += [task_inference.row_text(row, "pair_text") for row in rows]
    return PairEmbeddings(np.concatenate(images), np.concatenate(texts), np.concatenate(labels),
                          text)


def recall_at_k(embeddings: PairEmbeddings, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Image -> text retrieval over the true pairs: for each image, every distinct text of the
    split ranked by cosine; `recall@k` is the share of images whose own text is among the top k
    (a text that several products share counts once, and is right for each of them). Also
    `retrieval_candidates`, the number of distinct texts ranked."""
    keep = embeddings.labels > 0
    own = [t for t, k in zip(embeddings.text, keep) if k]
    column, first_rows = {}, []  # each distinct text -> its column; the first row holding it
    for i, t in enumerate(own):
        if t not in column:
            column[t] = len(first_rows)
            first_rows.append(i)
    text_vectors = embeddings.texts[keep][first_rows]
    similarity = embeddings.images[keep] @ text_vectors.T  # [images, distinct texts]
    own_column = np.array([column[t] for t in own])
    own_score = similarity[np.arange(len(own)), own_column]
    rank = np.sum(similarity > own_score[:, None], axis=1)  # 0: first
    return {**{f"recall@{k}": float(np.mean(rank < k)) for k in ks},
            "retrieval_candidates": float(len(column))}
