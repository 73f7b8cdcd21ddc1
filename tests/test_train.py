"""The train binary end to end on a tiny MMT4 and catalog (flax examples' train_test pattern):
train -> checkpoint -> SIGTERM -> resume equals uninterrupted; restore onto another mesh; clear
errors for a non-finite loss, a gin typo, an unknown task, a missing checkpoint and a batch the mesh
cannot split."""
import os
import signal

import jax
import numpy as np
import pytest

from mmt_jax import main
from mmt_jax.partitioning import Partitioner
from mmt_jax.training import checkpoints
from mmt_jax.training.checkpointer import Checkpointer
from mmt_jax.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tfds"))
    assert main.run(["data", "generate", "--out", out, "--num-products", "96", "--image-size", "32",
                     "--num-shards", "2"]) == 0
    return out


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
    model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    return model_dir, data_dir


def test_sigterm_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, capsys,
                                                          monkeypatch):
    model_dir, data_dir = uninterrupted
    assert main.run(_args(data_dir, model_dir, 6, "--gin.train.train.eval_period=3",
                          "--gin.train.train.eval_batches=1")) == 0
    out = capsys.readouterr().out
    straight = _losses(out)
    assert len(straight) == 6 and straight[-1] < straight[0]
    assert "step 3: eval accuracy" in out and "finished at step 6" in out and "eval_loss" in out
    assert sorted(os.listdir(model_dir))[:2] == ["checkpoint_3", "checkpoint_6"]

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
    _, resumed = checkpoints.load_checkpoint(os.path.join(interrupted, "checkpoint_6"))
    _, reference = checkpoints.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), resumed,
                           reference)


def test_checkpoint_restores_onto_another_mesh(uninterrupted):
    model_dir, _ = uninterrupted
    config, saved = checkpoints.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
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
    state, progress = Checkpointer(model_dir, config, 3).restore(trainer.abstract_state,
                                                                 trainer.state_shardings)
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
])
def test_clear_errors(data_dir, tmp_path, capsys, extra, message):
    assert main.run(_args(data_dir, str(tmp_path / "run"), 2, *extra)) == 2
    assert message in capsys.readouterr().err


def test_predictions_of_a_trained_checkpoint_and_their_metrics(uninterrupted):
    import seqio
    from mmt_jax import evaluate
    from mmt_jax.train import build_model
    model_dir, _ = uninterrupted
    config, params = checkpoints.load_checkpoint(os.path.join(model_dir, "checkpoint_6"))
    model = build_model(config)
    lengths = {"inputs": 24, "targets": 8}
    task = "train_test_color_removed100"
    rows = evaluate.predict_task(model, params, task, "validation", lengths, batch_size=4)
    expected = list(seqio.get_mixture_or_task(task).get_dataset(
        lengths, split="validation", shuffle=False, num_epochs=1).as_numpy_iterator())
    assert len(rows) == len(expected) > 4  # more than one batch, the last one padded
    assert [r.inputs for r in rows] == [e["inputs_pretokenized"].decode() for e in expected]
    assert [r.target for r in rows] == [e["targets_pretokenized"].decode() for e in expected]
    assert all(r.score <= 0 for r in rows)
    metrics = evaluate.evaluate_task(task, rows)
    exact = np.mean([r.prediction.strip().lower() == r.target.lower() for r in rows])
    assert metrics["attribute_accuracy"] == pytest.approx(exact)
    assert 0 <= metrics["attribute_recall_at_precision_0.9"] <= metrics["attribute_accuracy"]
