"""The binaries end to end on a tiny MMT4 and catalog (flax examples' train_test pattern):
train -> checkpoint -> SIGTERM -> resume equals uninterrupted; restore onto another mesh; eval ->
report and plots; infer and the Predictor give the eval pipeline's predictions; clear errors for a
non-finite loss, a gin typo, an unknown task, a missing checkpoint, a batch the mesh cannot split,
a too-long text, a corrupt image and a bad input record."""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mmt_jax import main, tasks
from mmt_jax.partitioning import Partitioner
from mmt_jax.checkpoints import digests, store
from mmt_jax.checkpoints.checkpointer import Checkpointer
from mmt_jax.training.trainer import Trainer


def _args(data_dir, model_dir, steps, *extra):
    return ["train", "--gin_file=runs/catalog.gin", "--gin_file=models/mmt4_tiny.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            "--gin.TASK='attributes_removed100'", "--gin.CATALOG_PREFIX='train_test'",
            f"--gin.DATA_DIR='{data_dir}'", "--gin.CATALOG='embedded-n96-s0-px32'",
            "--gin.IMAGE_SIZE=16", "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}",
            "--gin.t5.t5_config.num_encoder_layers=1", "--gin.t5.t5_config.num_decoder_layers=1",
            "--gin.t5.t5_config.dropout_rate=0.1", "--gin.LEARNING_RATE=3e-3",
            "--gin.train.train.log_period=1", "--gin.train.train.checkpoint_period=3", *extra]


def _losses(out: str) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("step ") and "/" in line.split()[1]]  # "step 3/6  loss ..."


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Six steps with evaluation (loss, and decoded accuracy on 4 products per task) every 3, and the
    label-prior check from step 6: `(model_dir, data_dir, stdout and stderr)`."""
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert main.run(_args(data_dir, model_dir, 6, "--gin.train.train.eval_period=3",
                              "--gin.train.train.eval_batches=1",
                              "--gin.train.train.infer_eval_examples=4",
                              "--gin.train.train.collapse_check_steps=6")) == 0
    return model_dir, data_dir, out.getvalue()


def test_sigterm_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, capsys,
                                                          monkeypatch):
    model_dir, data_dir, out = uninterrupted
    straight = _losses(out)
    assert len(straight) == 6 and straight[-1] < straight[0]
    assert "step 3: eval " in out and "finished at step 6" in out and "eval_loss" in out
    assert "eval_sequence_accuracy" in out and "exact match " in out and " of 8 examples" in out
    # the inference metrics of every attribute task of the mixture, at both evaluations
    for attribute in ("color", "pattern", "sleeve_type", "brand", "material"):
        assert out.count(f"train_test_{attribute}_removed100/attribute_accuracy") == 3  # + summary
    assert sorted(n for n in os.listdir(model_dir) if n.startswith("checkpoint")) == [
        "checkpoint_3", "checkpoint_6"]

    # The same run, sent SIGTERM during step 2: it saves step 2 and stops; a rerun resumes there.
    interrupted = str(tmp_path / "interrupted")
    original = Trainer.train_step
    calls = []

    def step_then_signal(self, *args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert main.run(_args(data_dir, interrupted, 6)) == 0
    out = capsys.readouterr()
    assert "stopped by signal at step 2" in out.out and "received SIGTERM" in out.err
    assert os.path.isdir(os.path.join(interrupted, "checkpoint_2"))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main.run(_args(data_dir, interrupted, 6)) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "(step 2)" in out
    np.testing.assert_allclose(_losses(out), straight[2:], rtol=1e-5)
    _, resumed = store.load_checkpoint(os.path.join(interrupted, "checkpoint_6"))
    _, reference = store.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), resumed,
                           reference)


def test_a_run_already_at_its_last_step_reads_no_data(uninterrupted, tmp_path, capsys,
                                                     monkeypatch):
    """Rerunning a finished run returns at once: before, it started the input pipeline, which
    skipped through every batch already read on a background thread (minutes and gigabytes for
    the demo's catalog) while the run had nothing left to do."""
    from mmt_jax.training import batch_feeder
    model_dir, data_dir, _ = uninterrupted
    finished = str(tmp_path / "finished")
    shutil.copytree(model_dir, finished)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run started its input pipeline")

    monkeypatch.setattr(batch_feeder.BatchFeeder, "__init__", refuse)
    assert main.run(_args(data_dir, finished, 6)) == 0
    out = capsys.readouterr().out
    assert "already at step 6 of 6" in out and "step 1/" not in out


def test_sigterm_while_the_input_pipeline_warms_up_ends_the_run(data_dir, tmp_path, capsys,
                                                                monkeypatch):
    """The first training batch takes 20 s (a filling shuffle buffer, a resumed run skipping its
    batches); SIGTERM during the wait ends the run at once, with nothing to save at step 0."""
    import tensorflow as tf
    from mmt_jax import train as train_module
    real_get_dataset = train_module.get_dataset

    def stall(batch):
        wait = tf.py_function(lambda: time.sleep(20) or 0, [], tf.int32)
        with tf.control_dependencies([wait]):
            return {k: tf.identity(v) for k, v in batch.items()}

    def slow_get_dataset(model, name, split, *args, **kwargs):
        ds = real_get_dataset(model, name, split, *args, **kwargs)
        return ds.map(stall) if split == "train" else ds

    signalled = []

    def signal_once_the_run_listens():
        while getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "_handle":
            time.sleep(0.05)
        time.sleep(1.0)  # the loop is waiting for its first batch by now
        signalled.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_module, "get_dataset", slow_get_dataset)
    threading.Thread(target=signal_once_the_run_listens, daemon=True).start()
    assert main.run(_args(data_dir, str(tmp_path / "run"), 4)) == 0
    assert time.perf_counter() - signalled[0] < 10  # not after the 20 s wait for the first batch
    out = capsys.readouterr()
    assert "received SIGTERM" in out.err
    assert "stopped by signal at step 0; no step was taken, nothing to save" in out.out
    assert not any(n.startswith("checkpoint_") for n in os.listdir(tmp_path / "run"))


def _assert_same_params(model_dir_a, model_dir_b, step=6):
    _, a = store.load_checkpoint(os.path.join(model_dir_a, f"checkpoint_{step}"))
    _, b = store.load_checkpoint(os.path.join(model_dir_b, f"checkpoint_{step}"))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
        uninterrupted, tmp_path, capsys):
    model_dir, data_dir, _ = uninterrupted
    run_dir = str(tmp_path / "run")
    shutil.copytree(model_dir, run_dir, ignore=shutil.ignore_patterns("train", "eval"))
    newest = os.path.join(run_dir, "checkpoint_6")
    with open(os.path.join(newest, "progress", "metadata"), "w") as f:
        f.write('{"step": 6, "batches_read": 0}')  # an edit, not a crash: same size or not
    assert main.run(_args(data_dir, run_dir, 6)) == 0
    out = capsys.readouterr().out
    assert "checkpoint_6 is corrupt: progress/metadata" in out and "resumed from" in out
    assert "(step 3)" in out and os.path.isdir(os.path.join(run_dir, "corrupt", "checkpoint_6"))
    _assert_same_params(run_dir, model_dir)


def _run_until_killed(command, run_dir, delay):
    """Starts the train binary; SIGKILLs it `delay` seconds after orbax's temporary directory of a
    new checkpoint appears. Returns its output and whether it was killed (False: it finished
    first)."""
    before = set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        if os.path.isdir(run_dir) and any(name.endswith(".orbax-checkpoint-tmp")
                                          and name not in before for name in os.listdir(run_dir)):
            time.sleep(delay)
            process.kill()
            break
        time.sleep(0.001)
    killed = process.wait() == -signal.SIGKILL
    reader.join()
    return "".join(lines), killed


def test_kill_9_at_random_moments_then_resume_ends_as_an_uninterrupted_run(uninterrupted,
                                                                           tmp_path):
    """SIGKILL (no handler runs) during saves and between them; every restart resumes from a
    checkpoint that verifies, none is ever corrupt, and the end equals the uninterrupted run."""
    model_dir, data_dir, _ = uninterrupted
    run_dir = str(tmp_path / "killed")
    args = [a.replace("checkpoint_period=3", "checkpoint_period=1") for a in
            _args(data_dir, run_dir, 6)]
    command = [sys.executable, "-m", "mmt_jax.main", *args]
    rng = np.random.default_rng(0)
    kills = 0

    def steps_on_disk():
        names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
        steps = [int(n.split("_")[1]) for n in names
                 if n.startswith("checkpoint_") and n.split("_")[1].isdigit()]
        for step in steps:
            assert digests.verify(os.path.join(run_dir, f"checkpoint_{step}")), step
        return steps

    def assert_resumed_from_the_newest(out, steps):
        expected = (f"resumed from {run_dir}/checkpoint_{max(steps)} " if steps else "steps 0..6")
        assert expected in out, out[-2000:]

    # the first kill lands inside a save (no delay), the second at a random moment after a save
    # starts (inside it or in the step after: every step saves)
    for delay in (0.0, rng.uniform(0, 0.3)):
        steps = steps_on_disk()
        out, killed = _run_until_killed(command, run_dir, float(delay))
        kills += killed
        assert_resumed_from_the_newest(out, steps)
    assert kills == 2 and steps_on_disk()
    steps = steps_on_disk()
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_resumed_from_the_newest(finished.stdout, steps)
    assert "finished at step 6" in finished.stdout
    assert not os.path.exists(os.path.join(run_dir, "corrupt"))
    _assert_same_params(run_dir, model_dir)


def test_checkpoint_restores_onto_another_mesh(uninterrupted):
    model_dir, _, _ = uninterrupted
    config, saved = store.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
    from mmt_jax.data import vocabulary
    from mmt_jax.model import EncoderDecoderModel
    from mmt_jax.training import optimizers
    model = EncoderDecoderModel(config.module(), vocabulary.vocabulary(), vocabulary.vocabulary())
    shapes = {"encoder_input_tokens": (8, 24), "decoder_input_tokens": (8, 8),
              "decoder_target_tokens": (8, 8), "decoder_loss_weights": (8, 8),
              "encoder_images": (8, 16, 16, 3), "encoder_image_mask": (8,)}
    types = {k: np.float32 if k == "encoder_images" else np.int32 for k in shapes}
    optimizer = optimizers.adamw(optimizers.linear_decay(3e-3, 6))  # as runs/train.gin builds it
    trainer = Trainer(model, Partitioner((2, 1, 4)), optimizer, shapes, types)
    with Checkpointer(model_dir, config, 3) as checkpointer:
        state, progress = checkpointer.restore(trainer.abstract_state, trainer.state_shardings)
    assert progress == {"step": 6, "batches_read": 6}
    embedding = state.params["token_embedder"]["embedding"]
    assert embedding.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert dict(embedding.sharding.mesh.shape) == {"data": 2, "expert": 1, "model": 4}
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), saved)


def test_non_finite_loss_stops_and_names_the_step(data_dir, tmp_path, capsys):
    model_dir = str(tmp_path / "nan")
    assert main.run(_args(data_dir, model_dir, 6, "--gin.LEARNING_RATE=1e12",
                          "--gin.optimizers.adamw.clip_norm=None")) == 2
    err = capsys.readouterr().err
    assert "error: loss is" in err and " at step " in err and "resume" in err
    assert not any(name.startswith("checkpoint_") for name in os.listdir(model_dir)) or (
        "the last good checkpoint is" in err)


@pytest.mark.parametrize("extra, message", [
    (["--gin.train.train.total_stepz=3"], "gin:"),
    (["--gin.TASK='colour_removed100'"], "no catalog task 'colour_removed100'"),
    (["--gin.INITIAL_CHECKPOINT_PATH='/nowhere/checkpoint_1'"], "no such checkpoint"),
    (["--gin.BATCH_SIZE=12"], "does not divide over the 8 data-parallel shards"),
    (["--gin.MESH_SHAPE=(3, 1, 1)"], "needs 3 devices, 8 are available"),
    # An attribute the catalog never names: an empty task, which repeated would spin forever.
    (["--gin.tasks.catalog_task.attributes=('fit',)", "--gin.CATALOG_PREFIX='train_test_fit'"],
     "task train_test_fit_fit_removed100 has no examples in its 'train' split: catalog "
     "embedded-n96-s0-px32 under "),
    (["--gin.tasks.catalog_task.attributes=('fit',)", "--gin.CATALOG_PREFIX='train_test_fit'"],
     "has 81 products in 'train', naming the attributes: brand (81), color (81), material (81), "
     "pattern (81), sleeve_type (30); name yours with tasks.catalog_task.attributes=(...)"),
])
def test_clear_errors(data_dir, tmp_path, capsys, extra, message):
    assert main.run(_args(data_dir, str(tmp_path / "run"), 2, *extra)) == 2
    assert message in capsys.readouterr().err


def test_predictions_of_a_trained_checkpoint_and_their_metrics(uninterrupted):
    import seqio
    from mmt_jax import task_inference
    from mmt_jax.task_inference import build_model
    model_dir, _, _ = uninterrupted
    config, params = store.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
    model = build_model(config)
    lengths = {"inputs": 24, "targets": 8}
    task = "train_test_color_removed100"
    rows = task_inference.predict_task(model, params, task, "validation", lengths, batch_size=4)
    expected = list(seqio.get_mixture_or_task(task).get_dataset(
        lengths, split="validation", shuffle=False, num_epochs=1).as_numpy_iterator())
    assert len(rows) == len(expected) > 4  # more than one batch, the last one padded
    assert [r.inputs for r in rows] == [e["inputs_pretokenized"].decode() for e in expected]
    assert [r.target for r in rows] == [e["targets_pretokenized"].decode() for e in expected]
    assert all(r.score <= 0 for r in rows)
    # the batches read once serve any number of passes (the train binary's evaluations)
    batches = list(task_inference.task_batches(model, task, "validation", lengths, 4, None))
    assert task_inference.predict_batches(model, params, task, batches) == rows
    scored = task_inference.score_batches(model, params, batches)
    assert [target for target, _ in scored] == [r.target for r in rows]
    assert all(loss > 0 for _, loss in scored)
    metrics = task_inference.evaluate_task(task, rows)
    exact = np.mean([r.prediction.strip().lower() == r.target.lower() for r in rows])
    assert metrics["attribute_accuracy"] == pytest.approx(exact)
    assert 0 <= metrics["attribute_recall_at_precision_0.9"] <= metrics["attribute_accuracy"]


def test_training_names_the_tasks_still_at_their_label_prior(uninterrupted):
    """Six steps teach nothing: from `collapse_check_steps` on, every attribute task's held-out loss
    is above its answers' entropy, and the run says so per task (and logs both figures)."""
    model_dir, data_dir, out = uninterrupted
    warnings = [line for line in out.splitlines() if line.startswith("warning: task ")]
    for attribute in ("color", "pattern", "sleeve_type"):
        task = f"train_test_{attribute}_removed100"
        assert any(line.startswith(f"warning: task {task} has not learned from its inputs by step 6")
                   for line in warnings), out[-3000:]
        assert f"{task}/prior_entropy" in out and f"{task}/loss_per_example" in out
    assert not any("by step 3" in line for line in warnings)  # checked from step 6 only


def test_eval_needs_only_the_checkpoint_and_writes_the_report_predictions_and_plots(
        uninterrupted, tmp_path, capsys):
    """The checkpoint records its catalog task (`ModelConfig.trained_task`): eval given nothing else
    evaluates the tasks it was trained on, on its catalog, with its images, and writes the report,
    each task's predictions and the plots; one that records no task needs TASK."""
    model_dir, data_dir, _ = uninterrupted
    config, params = store.load_checkpoint(model_dir)
    assert config.trained_task["task"] == "attributes_removed100"
    assert config.trained_task["data_dir"] == os.path.abspath(data_dir)
    only = ["eval", "--gin_file=runs/eval.gin", "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}"]
    out = tmp_path / "eval"
    assert main.run(only + [f"--gin.CHECKPOINT_PATH='{model_dir}'",
                            f"--gin.EVAL_OUTPUT_DIR='{out}'"]) == 0
    assert "wrote the report of 5 task(s) and 1 plot(s)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == os.path.join(model_dir, "checkpoint_6")  # the newest
    assert sorted(report["tasks"]) == sorted(f"train_test_{a}_removed100"
                                             for a in tasks.DEFAULT_ATTRIBUTES)
    for task, result in report["tasks"].items():
        rows = [json.loads(line) for line in (out / "predictions" / f"{task}.jsonl").open()]
        assert len(rows) == result["num_examples"] > 0 and all(r["id"] for r in rows)
        exact = np.mean([r["prediction"].strip().lower() == r["target"].lower() for r in rows])
        assert result["metrics"]["attribute_accuracy"] == pytest.approx(exact)
        # A task whose predictions are all one string is flagged (six steps often teach only that).
        constant = len({r["prediction"] for r in rows}) == 1
        assert result["warnings"] == ([f"task {task}: all {len(rows)} predictions are "
                                       f"{rows[0]['prediction']!r}"] if constant else [])
    assert (out / "attribute_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    unrecorded = str(tmp_path / "unrecorded")
    store.save_checkpoint(unrecorded, params, dataclasses.replace(config, trained_task=None))
    assert main.run(only + [f"--gin.CHECKPOINT_PATH='{unrecorded}'",
                            f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval2'}'"]) == 2
    assert f"no catalog task given, and {unrecorded} does not record its training task" in (
        capsys.readouterr().err)


def _eval_args(data_dir, checkpoint, output_dir, task, *extra):
    return ["eval", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
            f"--gin.EVAL_OUTPUT_DIR='{output_dir}'", f"--gin.TASK='{task}'",
            "--gin.CATALOG_PREFIX='train_test'", f"--gin.DATA_DIR='{data_dir}'",
            "--gin.CATALOG='embedded-n96-s0-px32'", "--gin.BATCH_SIZE=8",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}", *extra]


def test_eval_binary_evaluates_a_task_it_is_given_with_its_plots(uninterrupted, tmp_path):
    model_dir, data_dir, _ = uninterrupted
    assert main.run(_eval_args(data_dir, model_dir, tmp_path / "match", "match")) == 0
    report = json.loads((tmp_path / "match" / "report.json").read_text())
    metrics = report["tasks"]["train_test_match"]["metrics"]
    assert {"match_accuracy", "match_roc_auc", "match_pr_auc"} <= set(metrics)
    assert report["plots"] == [f"train_test_match_{kind}.png" for kind in ("roc", "pr", "confusion")]
    for name in report["plots"]:
        assert (tmp_path / "match" / name).stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--gin.IMAGE=@image_spec.ImagePreprocessing()", "--gin.IMAGE_SIZE=32",
      "--gin.CATALOG_PREFIX='train_test_px32'"], "preprocesses images as"),
    (["--gin.CHECKPOINT_PATH='/nowhere'"], "no such checkpoint directory"),
    (["--gin.TASK='pretrain'"], "has no task with inference metrics"),
])
def test_eval_clear_errors(uninterrupted, tmp_path, capsys, extra, message):
    model_dir, data_dir, _ = uninterrupted
    assert main.run(_eval_args(data_dir, model_dir, tmp_path, "color_removed100", *extra)) == 2
    assert message in capsys.readouterr().err


def test_length_buckets_are_powers_of_two_up_to_the_input_length():
    from mmt_jax.predictor import length_bucket
    assert [length_bucket(n, 48) for n in (1, 8, 9, 17, 33, 48)] == [8, 8, 16, 32, 48, 48]


def test_infer_and_the_predictor_see_products_as_the_eval_pipeline_does(uninterrupted, tmp_path):
    from mmt_jax import infer
    from mmt_jax import task_inference
    from mmt_jax.predictor import Predictor, Query
    from mmt_jax.task_inference import build_model
    model_dir, data_dir, _ = uninterrupted
    config, params = store.load_checkpoint(model_dir)
    rows = task_inference.predict_task(build_model(config), params, "train_test_color_removed100",
                                 "validation", {"inputs": 24, "targets": 8}, batch_size=4)
    # the stored validation products, read back from the TFRecord files as the infer binary does
    pattern = os.path.join(data_dir, "product_catalog", "embedded-n96-s0-px32", "*",
                           "product_catalog-validation.tfrecord*")
    products = {p.id: p for p in infer.read_products(pattern)}
    assert {r.id for r in rows} == set(products)
    # longer than the 24 evaluated: each batch is cut to the length bucket of its longest text
    # (at most 24 tokens: 32, or shorter), and the answers are the same
    predictor = Predictor.from_checkpoint(model_dir, input_length=64, target_length=8,
                                          batch_size=4)
    queries = [Query(r.id, "", r.inputs, image=products[r.id].image) for r in rows]
    assert predictor._batch(queries[:4])["encoder_input_tokens"].shape[1] in (8, 16, 32)
    for row, (query, prediction) in zip(rows, predictor.predict_queries(queries)):
        assert query.record == row.id and prediction.text == row.prediction
        assert prediction.score == pytest.approx(row.score, abs=1e-4)
    # data parallel over the 8 host devices (2 rows each): the one device's predictions
    import jax
    spread = Predictor.from_checkpoint(model_dir, input_length=24, target_length=8, batch_size=4,
                                       devices=jax.devices())
    assert (spread.batch_size, len(spread.devices), len(predictor.devices)) == (8, 8, 1)
    for (_, one), (_, many) in zip(predictor.predict_queries(queries),
                                   spread.predict_queries(queries)):
        assert many.text == one.text and many.score == pytest.approx(one.score, abs=1e-5)

    # The infer binary on a JSONL catalog with image files: one line per product and prompt.
    from mmt_jax.data import catalog
    jsonl, images = tmp_path / "products.jsonl", tmp_path / "images"
    catalog.write_jsonl(catalog.generate_catalog(3, seed=7, image_size=32), str(jsonl), str(images))
    out = tmp_path / "predictions.jsonl"
    args = ["infer", "--checkpoint", model_dir, "--input", str(jsonl), "--images", str(images),
            "--prompt", "color:", "--prompt", "pattern:", "--out", str(out), "--input-length", "24",
            "--target-length", "8", "--batch-size", "4"]
    assert main.run(args) == 0
    lines = [json.loads(line) for line in out.open()]
    assert [(r["id"], r["prompt"]) for r in lines] == [
        (p.id, prompt) for p in catalog.generate_catalog(3, seed=7, image_size=32)
        for prompt in ("color:", "pattern:")]
    first = catalog.make_product(0, seed=7, image_size=32)
    direct = predictor.predict(image=first.image, title=first.title, prompt="color:")
    # (infer splits its batches over all 8 host devices: the same answer, the score to float error)
    assert (lines[0]["prediction"], lines[0]["score"]) == pytest.approx((direct.text, direct.score),
                                                                        abs=1e-5)
    # int8 decoding (quantization.py): the same answers, the scores to its rounding
    out8 = tmp_path / "predictions_int8.jsonl"
    assert main.run([str(out8) if a == str(out) else a for a in args] + ["--int8"]) == 0
    lines8 = [json.loads(line) for line in out8.open()]
    assert [r["prediction"] for r in lines8] == [r["prediction"] for r in lines]
    assert [r["score"] for r in lines8] == pytest.approx([r["score"] for r in lines], rel=0.05)
    assert [r["score"] for r in lines8] != [r["score"] for r in lines]  # but rounded: int8 ran
    # the same image as a file path, a PIL image and an array gives the same answer
    from PIL import Image
    picture = Image.open(io.BytesIO(first.image))
    for image in (str(images / os.listdir(images)[0]), picture, np.asarray(picture.convert("RGB"))):
        again = predictor.predict(image=image, title=first.title, prompt="color:")
        assert again.text == direct.text
    beams = Predictor.from_checkpoint(model_dir, input_length=24, target_length=8, batch_size=4,
                                      num_beams=3)
    assert beams.predict(image=first.image, title=first.title, prompt="color:").score <= 0


def test_infer_clear_errors_and_no_half_written_output(uninterrupted, tmp_path, capsys):
    from mmt_jax.errors import InputError
    from mmt_jax.predictor import Predictor
    model_dir, _, _ = uninterrupted
    predictor = Predictor.from_checkpoint(model_dir, input_length=24, target_length=8)
    with pytest.raises(InputError, match=r"record 'query'.*more than input_length=24"):
        predictor.predict(title="long " * 40, prompt="color:")
    with pytest.raises(InputError, match=r"record 'query': field 'image': corrupt"):
        predictor.predict(image=b"\x89PNG not really", prompt="color:")

    jsonl, out = tmp_path / "products.jsonl", tmp_path / "predictions.jsonl"
    jsonl.write_text('{"id": "a", "title": "red shirt"}\n{"id": "b", "titel": "blue shirt"}\n')
    out.write_text("earlier results\n")
    args = ["infer", "--checkpoint", model_dir, "--input", str(jsonl), "--prompt", "color:",
            "--out", str(out), "--input-length", "24", "--target-length", "8"]
    assert main.run(args) == 2
    assert "line 2, record 'b': field 'titel': unknown field" in capsys.readouterr().err
    assert out.read_text() == "earlier results\n"  # untouched, and no temporary file left behind
    assert sorted(os.listdir(tmp_path)) == ["predictions.jsonl", "products.jsonl"]
    assert main.run(args + ["--on-error", "skip"]) == 0
    assert [json.loads(line)["id"] for line in out.open()] == ["a"]
