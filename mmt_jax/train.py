"""The train binary's body: `train()` is what `mmt-jax train --gin_file=...` runs, configured by gin.

    mmt-jax train --gin_file=runs/pretrain.gin --gin_file=models/mmt4_tiny.gin --gin.MODEL_DIR=\\"runs/mmt4\\" --gin.TRAIN_STEPS=300

A run reads its task through seqio (each process its own shard of the data), builds the sharded train
state on the mesh, restores `model_dir`'s latest checkpoint if there is one (resuming at the same data
position, so the loss curve continues as if never stopped), and trains with periodic checkpoints,
evaluation (held-out loss, and the tasks' inference metrics on decoded examples) and metric logs
(TensorBoard under `model_dir/train` and `model_dir/eval`). A non-finite
loss stops the run naming the step and the last good checkpoint; SIGTERM saves and exits cleanly.
Resuming takes the newest checkpoint whose digests verify (a corrupt one is moved to
`model_dir/corrupt/`, and the run says so), and a second run on the same model_dir is refused.
"""
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Mapping

import jax
import numpy as np
import optax
import seqio
from clu import metric_writers
from tqdm.auto import tqdm

from mmt_jax import task_health, task_inference, tasks
from mmt_jax.checkpoints.checkpointer import Checkpointer
from mmt_jax.errors import TrainingError
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.config import ModelConfig
from mmt_jax.partitioning import Partitioner
from mmt_jax.training.batch_feeder import BatchFeeder
from mmt_jax.training.trainer import Trainer


@dataclasses.dataclass
class RunResult:
    step: int
    train_metrics: dict
    eval_metrics: dict
    stopped_by_signal: bool = False


def get_dataset(model: EncoderDecoderModel, mixture_or_task_name: str, split: str,
                task_feature_lengths: Mapping[str, int], batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                shard: tuple[int, int] | None = None):
    """This process's share of the global batch, as a batched tf.data.Dataset of numpy dicts.

    `shard` = (index, count) of the data shard and of the processes sharing the global batch;
    default: this process's (`jax.process_index()`, `jax.process_count()`)."""
    provider = task_inference.get_task(mixture_or_task_name)
    task_vocab = provider.output_features["targets"].vocabulary
    if getattr(task_vocab, "sentencepiece_model_file", None) != getattr(
            model.output_vocabulary, "sentencepiece_model_file", None):
        raise TrainingError(f"task {mixture_or_task_name!r} tokenises with "
                            f"{getattr(task_vocab, 'sentencepiece_model_file', task_vocab)}, the model "
                            f"with {model.output_vocabulary.sentencepiece_model_file}")
    index, processes = shard or (jax.process_index(), jax.process_count())
    if batch_size % processes:
        raise TrainingError(f"batch size {batch_size} does not divide over {processes} processes")
    ds = seqio.get_dataset(
        mixture_or_task_name, task_feature_lengths, dataset_split=split, shuffle=shuffle,
        num_epochs=num_epochs, seed=seed, use_cached=False,
        shard_info=seqio.ShardInfo(index, processes) if processes > 1 else None,
        feature_converter=model.FEATURE_CONVERTER_CLS(pack=False))
    return ds.batch(batch_size // processes, drop_remainder=True)


@functools.lru_cache(maxsize=None)
def _check_not_empty(task_name: str, split: str, task_feature_lengths: tuple) -> None:
    """A TrainingError when task `task_name` has not a single example in `split`, saying what its
    source holds when the source can say (a catalog: its attributes). A catalog's metadata mostly
    tells (`tasks.has_examples`); otherwise the first example is read, which builds the task's
    pipeline (seconds), so a task found non-empty is not checked again in this process."""
    task = seqio.get_mixture_or_task(task_name)
    known = tasks.has_examples(task_name, split)
    if known is None:
        first = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False,
                                 num_epochs=1, use_cached=False).take(1)
        known = next(first.as_numpy_iterator(), None) is not None
    if not known:
        describe = getattr(task.source, "describe", None)
        raise TrainingError(f"task {task.name} has no examples in its '{split}' split"
                            + (f": {describe(split)}" if describe else ""))


def train(*, model_config: ModelConfig, mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int], batch_size: int, total_steps: int,
          model_dir: str, optimizer: optax.GradientTransformation,
          mesh_shape=(-1, 1, 1), logical_axis_rules=None, num_microbatches: int = 1,
          checkpoint_period: int = 1000, keep_checkpoints: int | None = 3,
          log_period: int = 50, eval_period: int = 0, eval_batches: int = 8,
          eval_split: str = "validation", infer_eval_examples: int = 0,
          collapse_check_steps: int = 300, collapse_check_examples: int = 128,
          initial_checkpoint: str | None = None, dropout: bool = True, seed: int = 0,
          model_kwargs: Mapping | None = None) -> RunResult:
    """Trains `model_config` on a seqio task to `total_steps`; see the module docstring.

    Args:
      batch_size: the global batch (all processes together).
      mesh_shape: sizes of the (data, expert, model) mesh axes; -1 takes the remaining devices.
      num_microbatches: gradient accumulation within one step.
      checkpoint_period, keep_checkpoints: save every N steps (and at the end), keep the newest K.
      log_period: steps between metric logs (and the non-finite loss check).
      eval_period, eval_batches, eval_split: validation loss every N steps over that many batches
        (0: never).
      infer_eval_examples: also decode that many examples of each task of the mixture that has
        inference metrics, at the same steps, and log the tasks' metrics as `<task>/<metric>`
        (0: loss only); a task whose predictions are all the same is warned about.
      collapse_check_steps, collapse_check_examples: at every evaluation from this step on (0:
        never), score that many held-out examples of each task with inference metrics and warn,
        naming the task, when its loss is still at its label prior's entropy (`task_health`); the
        figures are logged as `<task>/loss_per_example` and `<task>/prior_entropy`.
      initial_checkpoint: an mmt_jax checkpoint whose matching parameters start this run (e.g. a
        converted T5, or the pretrained MMT4), ignored when `model_dir` already has a checkpoint.
      dropout: apply the model's dropout rate in training.
      model_kwargs: passed to the Model (label_smoothing, z_loss, ...).
    """
    model = task_inference.build_model(model_config, **dict(model_kwargs or {}))
    tasks.check_text_sources(mixture_or_task_name, model_config.text_sources)
    # The checkpoints record what the task asked, so that infer can flag a prompt never trained,
    # and the catalog task itself, so that eval needs only the checkpoint.
    model_config = dataclasses.replace(
        model_config, prompts=tasks.task_prompts(mixture_or_task_name),
        trained_task=tasks.catalog_task_record(mixture_or_task_name))
    try:
        partitioner = Partitioner(mesh_shape, logical_axis_rules)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    train_ds = get_dataset(model, mixture_or_task_name, "train", task_feature_lengths, batch_size,
                           seed)
    local_shapes = {k: tuple(v.shape) for k, v in train_ds.element_spec.items()}
    input_shapes = {k: (batch_size,) + s[1:] for k, s in local_shapes.items()}
    input_types = {k: v.dtype.as_numpy_dtype for k, v in train_ds.element_spec.items()}
    trainer = Trainer(model, partitioner, optimizer, input_shapes, input_types, num_microbatches)
    with Checkpointer(model_dir, model_config, checkpoint_period, keep_checkpoints) as checkpointer:
        is_chief = jax.process_index() == 0
        say = print if is_chief else (lambda *a, **k: None)

        def warn(message: str) -> None:
            if is_chief:
                print(f"warning: {message}", file=sys.stderr, flush=True)

        if checkpointer.latest_step() is not None:
            state, progress = checkpointer.restore(trainer.abstract_state,
                                                   trainer.state_shardings, say=say)
            batches_read = progress["batches_read"]
            say(f"resumed from {checkpointer.path(progress['step'])} (step {progress['step']})")
        else:
            # A fresh run's tasks are read once first: one without a single example would keep the
            # repeated pipeline spinning forever (a resumed run has read from them already).
            provider = task_inference.get_task(mixture_or_task_name)
            for task in provider.tasks if isinstance(provider, seqio.Mixture) else [provider]:
                _check_not_empty(task.name, "train", tuple(sorted(task_feature_lengths.items())))
            state, fresh, derived = trainer.initial_state(seed, initial_checkpoint)
            batches_read = 0
            if initial_checkpoint:
                say(f"initialised from {initial_checkpoint}; fresh: {', '.join(fresh) or 'nothing'}"
                    + (f"; derived (a dense MLP copied to every expert, MoEMoE's question and "
                       f"text encoders from the encoder): {', '.join(derived)}" if derived else ""))
        start_step = int(jax.device_get(state.step))
        if start_step >= total_steps:  # nothing to do: reading on would only skip through the data
            say(f"{mixture_or_task_name}: already at step {start_step} of {total_steps}")
            return RunResult(start_step, {}, {})
        batches = train_ds.skip(batches_read).prefetch(2).as_numpy_iterator()
        eval_ds = (get_dataset(model, mixture_or_task_name, eval_split, task_feature_lengths,
                               batch_size, seed, shuffle=False, num_epochs=1)
                   .take(eval_batches).cache() if eval_period else None)
        writer = metric_writers.create_default_writer(os.path.join(model_dir, "train"),
                                                      just_logging=not is_chief)

        @functools.cache
        def held_out_batches(task_name: str) -> list:
            """A task's first examples of the eval split, as many as the inference evaluation or
            the collapse check reads, as batches: read once and kept in memory, since every
            evaluation decodes (or scores) the same examples."""
            return list(task_inference.task_batches(
                model, task_name, eval_split, task_feature_lengths, batch_size,
                max(infer_eval_examples, collapse_check_examples if collapse_check_steps else 0)))

        def held_out(task_name: str, max_examples: int):
            """The first `max_examples` of `held_out_batches(task_name)`, as `task_batches`."""
            for rows, batch, n in held_out_batches(task_name):
                if max_examples <= 0:
                    return
                yield rows[:max_examples], batch, min(n, max_examples)
                max_examples -= n

        eval_writer = metric_writers.create_default_writer(os.path.join(model_dir, "eval"),
                                                           just_logging=not is_chief)
        dropout_rng = jax.random.key(seed + 1) if dropout else None
        say(f"{mixture_or_task_name}: steps {start_step}..{total_steps}, global batch "
            f"{batch_size}, mesh {dict(partitioner.mesh.shape)} over {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")

        stop = _StopSignal()
        pending_losses, window_metrics, last_good = [], None, _last_checkpoint(checkpointer)
        eval_metrics, train_metrics = {}, {}
        bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not (
            is_chief and sys.stderr.isatty()), dynamic_ncols=True)
        window_start, window_steps = time.perf_counter(), 0
        step = start_step  # counted on the host: reading state.step would wait for every step
        # Alone, a run stops while it waits for data too; several processes agree at log steps.
        stop_waiting = lambda: stop.received and jax.process_count() == 1  # noqa: E731
        saved_step = checkpointer.latest_step()
        with stop, contextlib.closing(BatchFeeder(batches)) as feeder:
            while step < total_steps:
                batch = feeder.next(stop_waiting)
                if batch is None:  # a signal while the input pipeline had nothing ready
                    if step != (saved_step or 0) and checkpointer.save(state, batches_read,
                                                                       force=True):
                        saved_step = step
                    break
                step += 1
                state, metrics = trainer.train_step(state, trainer.global_batch(batch),
                                                    dropout_rng)
                batches_read += 1
                window_steps += 1
                pending_losses.append((step, metrics["loss"]))
                window_metrics = trainer.merge_metrics(window_metrics, metrics)
                bar.update(1)
                # Every process must stop at the same step (the save is collective): with several,
                # they compare notes at each log step; a signal to any of them stops them all.
                stopping = stop.received if jax.process_count() == 1 else (
                    step % log_period == 0 and _any_process(stop.received))
                due_checkpoint = step % checkpoint_period == 0 or step == total_steps or stopping
                if step % log_period == 0 or due_checkpoint:
                    _check_finite(pending_losses, last_good, model_dir)
                    pending_losses = []
                    elapsed = time.perf_counter() - window_start
                    train_metrics = {k: float(v.compute()) for k, v in window_metrics.items()}
                    train_metrics["examples_per_second"] = window_steps * batch_size / elapsed
                    writer.write_scalars(step, train_metrics)
                    bar.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                                    ex_s=f"{train_metrics['examples_per_second']:.0f}")
                    if bar.disable:
                        seen = round(train_metrics["num_examples"] * window_steps)
                        say(f"step {step}/{total_steps}  loss {train_metrics['loss']:.4f}  "
                            f"exact match {train_metrics['sequence_accuracy']:.3f} of {seen} "
                            f"examples (token accuracy {train_metrics['token_accuracy']:.3f})  "
                            f"{train_metrics['examples_per_second']:.0f} examples/s", flush=True)
                    window_metrics, window_start, window_steps = None, time.perf_counter(), 0
                if eval_ds is not None and (step % eval_period == 0 or step == total_steps):
                    eval_metrics = _evaluate(trainer, state.params, eval_ds)
                    if infer_eval_examples:
                        eval_metrics.update(_inference_metrics(
                            model, state.params, mixture_or_task_name, held_out,
                            infer_eval_examples, warn))
                    if collapse_check_steps and step >= collapse_check_steps:
                        eval_metrics.update(_prior_check(
                            model, state.params, mixture_or_task_name, held_out,
                            collapse_check_examples, step, warn))
                    eval_writer.write_scalars(step, eval_metrics)
                    say(f"step {step}: eval "
                        + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                if due_checkpoint and checkpointer.save(state, batches_read, force=True):
                    last_good, saved_step = checkpointer.path(step), step
                if stopping:
                    break
        bar.close()
        writer.flush()
        eval_writer.flush()
    stopped = step < total_steps
    if stopped:
        say(f"stopped by signal at step {step}; " + (
            f"saved {checkpointer.path(step)}" if saved_step == step else
            "no step was taken, nothing to save"))
    return RunResult(step, train_metrics, eval_metrics, stopped)


def _evaluate(trainer: Trainer, params, eval_ds) -> dict:
    merged = None
    for batch in eval_ds.as_numpy_iterator():
        merged = trainer.merge_metrics(merged, trainer.eval_step(params, trainer.global_batch(batch)))
    return {k: float(v.compute()) for k, v in (merged or {}).items()}


def _inference_metrics(model, params, mixture_or_task_name: str, held_out, max_examples: int,
                       warn) -> dict:
    metrics = {}
    for task in task_inference.leaf_tasks(mixture_or_task_name):
        rows = task_inference.predict_batches(model, params, task.name,
                                              held_out(task.name, max_examples))
        metrics.update({f"{task.name}/{k}": v
                        for k, v in task_inference.evaluate_task(task.name, rows).items()})
        constant = task_health.constant_predictions_warning(task.name, [r.prediction for r in rows])
        if constant:
            warn(constant)
    return metrics


def _prior_check(model, params, mixture_or_task_name: str, held_out, max_examples: int, step: int,
                 warn) -> dict:
    """Each task's held-out loss per example beside its label prior's entropy; warns at the prior."""
    metrics = {}
    for task in task_inference.leaf_tasks(mixture_or_task_name):
        scored = task_inference.score_batches(model, params, held_out(task.name, max_examples))
        checked = task_health.prior_check(task.name, scored, step)
        if checked is None:
            continue
        loss, entropy, message = checked
        metrics[f"{task.name}/loss_per_example"] = loss
        metrics[f"{task.name}/prior_entropy"] = entropy
        if message:
            warn(message)
    return metrics


def _any_process(flag: bool) -> bool:
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _check_finite(pending, last_good: str | None, model_dir: str) -> None:
    for step, loss in pending:
        loss = float(loss.compute())
        if not np.isfinite(loss):
            back = (f"the last good checkpoint is {last_good}" if last_good
                    else f"no checkpoint was written to {model_dir}")
            raise TrainingError(f"loss is {loss} at step {step}; stopped before saving it. "
                                f"{back}: lower the learning rate or check the data, then resume.")


def _last_checkpoint(checkpointer: Checkpointer) -> str | None:
    step = checkpointer.latest_step()
    return None if step is None else checkpointer.path(step)


class _StopSignal:
    """Within `with`, SIGTERM (and SIGINT) set `received` instead of killing the process, so the loop
    can save a checkpoint and return; the previous handlers come back on exit."""

    def __init__(self):
        self.received = False
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.received = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint and stopping",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
