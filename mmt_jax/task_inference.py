"""A task decoded by a model and scored with the task's own metrics: the library that the train
binary's inference evaluation, the eval binary, the Predictor and the main job all call.

`predict_task` runs greedy (or the model's) decoding over one split of one seqio task and returns a
row per example (the text it saw, the reference, the prediction and its score); `predict_batches`
does the same over batches already read (`task_batches`, kept in a list by a caller that decodes
the same examples again: the train binary at every evaluation); `score_batches` gives each
reference's loss without decoding (what `task_health` compares with the label prior); `evaluate_task`
applies the task's metric functions (`mmt_jax/metrics.py`) to those rows. `build_model` makes the
Model of a checkpoint's `ModelConfig` and `get_task` finds a task or mixture by name, as every entry
point needs.
"""
import dataclasses
import difflib
import functools
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
import seqio

from mmt_jax.data import vocabulary as vocab_lib
from mmt_jax.errors import TrainingError, UnknownTaskError
from mmt_jax.model import EncoderDecoderModel, model_for
from mmt_jax.models.config import ModelConfig
from mmt_jax.value_trie import ValueTrie


def model_vocabulary(model_config: ModelConfig) -> seqio.Vocabulary:
    """The config's vocabulary; a TrainingError if it has more ids than the model's embedding."""
    vocabulary = vocab_lib.vocabulary(model_config.vocabulary)
    if vocabulary.vocab_size > model_config.t5.vocab_size:
        raise TrainingError(f"the vocabulary has {vocabulary.vocab_size} ids but the model's "
                            f"embedding only {model_config.t5.vocab_size} (set t5.vocab_size)")
    return vocabulary


def build_model(model_config: ModelConfig, **kwargs) -> EncoderDecoderModel:
    """The Model of a config's family (`model.model_for`: dense or MoE); `kwargs` (label_smoothing,
    z_loss, decode_fn ...) are gin-bindable."""
    vocabulary = model_vocabulary(model_config)
    return model_for(model_config.module(), input_vocabulary=vocabulary,
                     output_vocabulary=vocabulary, **kwargs)


def get_task(name: str):
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(seqio.TaskRegistry.names() | seqio.MixtureRegistry.names())
        close = difflib.get_close_matches(name, known, n=5)
        raise UnknownTaskError(f"no task or mixture {name!r}"
                            + (f"; did you mean {', '.join(close)}?" if close else
                               f"; {len(known)} are registered (import tasks?)")) from None


@dataclasses.dataclass
class Prediction:
    """One decoded example; `source_weights`: MoEMoE's mean weight of each source (`{"image": ...,
    "context": ...}`, `models/moemoe.py`), None for other models."""
    id: str
    inputs: str
    target: str
    prediction: str
    score: float
    source_weights: dict[str, float] | None = None


def task_batches(model, task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                  batch_size: int, max_examples: int | None):
    """`(rows, batch padded to batch_size, n)` over `split` in order: the rows are the task's
    examples (text included) behind the batch's first `n` lines."""
    task = seqio.get_mixture_or_task(task_name)
    examples = task.get_dataset(task_feature_lengths, split=split, shuffle=False, num_epochs=1)
    if max_examples is not None:
        examples = examples.take(max_examples)
    converter = model.FEATURE_CONVERTER_CLS(pack=False)
    batches = converter(examples, task_feature_lengths).batch(batch_size)
    rows = examples.as_numpy_iterator()
    for batch in batches.as_numpy_iterator():
        n = len(batch["decoder_target_tokens"])
        padded = {k: _pad(v, batch_size) for k, v in batch.items()}  # one compiled shape
        yield [next(rows) for _ in range(n)], padded, n


def source_weights(model, aux: Mapping, n: int) -> list[dict[str, float] | None]:
    """The first `n` examples' source weights of `model.predict_batch_with_aux`'s aux, each
    `{source: weight}` by the module's source names (`{"image": ..., "context": ...}`; MoEMoE's
    only, None for other models)."""
    if "source_weights" not in aux:
        return [None] * n
    names = model.module.sources.names
    return [dict(zip(names, map(float, w))) for w in np.asarray(aux["source_weights"])[:n]]


def predict_task(model, params, task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, max_examples: int | None = None,
                 values: Sequence[str] | None = None) -> list[Prediction]:
    """Decodes `split` of `task_name` in order (no shuffling), `batch_size` examples per call;
    with `values`, closed-set decoding: every prediction is one of them (`value_trie.py`)."""
    return predict_batches(model, params, task_name, task_batches(
        model, task_name, split, task_feature_lengths, batch_size, max_examples), values)


def predict_batches(model, params, task_name: str, batches: Iterable,
                    values: Sequence[str] | None = None) -> list[Prediction]:
    """`predict_task` over `batches` of `task_name` as `task_batches` gives them."""
    predict = compiled(model, "predict_batch_with_aux")
    vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    trie = None if values is None else value_trie(vocabulary, {"values": values})
    results, decoder_params = [], None
    for rows, batch, n in batches:
        if trie is not None and decoder_params is None:  # every batch is padded to one size
            decoder_params = {"constraint": trie.constraint(
                ["values"] * len(batch["decoder_target_tokens"]))}
        tokens, aux = predict(params, batch, decoder_params=decoder_params)
        tokens, scores = np.asarray(tokens)[:n], np.asarray(aux["scores"])[:n]
        weights = source_weights(model, aux, n)
        for row, decoded, score, weight in zip(rows, tokens, scores, weights):
            results.append(Prediction(
                id=row_text(row, "id"), inputs=row_text(row, "inputs"),
                target=row_text(row, "targets"),
                prediction=vocabulary.decode(until_eos(decoded, vocabulary.eos_id)),
                score=float(score), source_weights=weight))
    return results


def score_batches(model, params, batches: Iterable) -> list[tuple[str, float]]:
    """`(reference text, its negative log-likelihood in nats)` per example of `batches` (as
    `task_batches` gives them), in order: the teacher-forced loss of each example's whole target
    (EOS included), no decoding."""
    score = compiled(model, "score_batch")
    results = []
    for rows, batch, n in batches:
        log_likelihoods = np.asarray(score(params, batch))[:n]
        results += [(row_text(row, "targets"), -float(ll)) for row, ll in zip(rows, log_likelihoods)]
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


def value_trie(vocabulary: seqio.Vocabulary, value_sets: Mapping[str, Sequence[str]]) -> ValueTrie:
    """The trie of `{set name: values}` for closed-set decoding, each value tokenised as the tasks
    tokenise targets, EOS appended."""
    return ValueTrie.build({name: [list(vocabulary.encode(v)) + [vocabulary.eos_id] for v in values]
                            for name, values in value_sets.items()})


@functools.lru_cache(maxsize=8)
def compiled(model, method: str):
    """One jitted `model.<method>` per model, shared by all of its tasks (same batch shapes, one
    compile)."""
    return jax.jit(getattr(model, method))


def row_text(row: dict, feature: str) -> str:
    """A task example's text feature as written (its `_pretokenized` form when seqio kept one)."""
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
