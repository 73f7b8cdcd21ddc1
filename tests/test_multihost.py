"""Multi-host training: two processes on localhost (CPU collectives through gloo), each with two
devices and its own shard of the data, train in lockstep to the losses and parameters of one process
fed the same global batches, and a SIGTERM to one of them stops both at the same step with one
checkpoint (one run, to start the processes once); then two processes infer with that checkpoint,
each its share of the products into its own file, together the one-process output."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmt_jax.partitioning import Partitioner
from mmt_jax.task_inference import build_model
from mmt_jax.train import get_dataset
from mmt_jax.checkpoints import store
from mmt_jax.training import optimizers
from mmt_jax.training.trainer import Trainer

# A run long enough to be stopped by a signal after SIGNAL_AFTER steps.
STEPS, SIGNAL_AFTER, BATCH, LENGTHS = 100000, 4, 8, {"inputs": 24, "targets": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(data_dir: str, model_dir: str, steps: int):
    """Starts both training processes; returns them with the paths of their (stdout, stderr)
    files."""
    return _start_processes(
        ["train", "--gin_file=runs/catalog.gin",
         "--gin_file=models/mmt4_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
         f"--gin.TRAIN_STEPS={steps}", "--gin.TASK='attributes_removed100'",
         "--gin.CATALOG_PREFIX='multihost'", f"--gin.DATA_DIR='{data_dir}'",
         "--gin.CATALOG='embedded-n96-s0-px32'", "--gin.IMAGE_SIZE=16",
         f"--gin.BATCH_SIZE={BATCH}", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
         "--gin.t5.t5_config.num_encoder_layers=1", "--gin.t5.t5_config.num_decoder_layers=1",
         "--gin.LEARNING_RATE=3e-3", "--gin.train.train.log_period=1",
         "--gin.train.train.checkpoint_period=1000"], model_dir)


def _start_processes(command: list[str], logs_prefix: str):
    """`mmt-jax <command>` as two processes of one jax.distributed job on localhost, each with
    two CPU devices: `[(process, (stdout file, stderr file))]`."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2")}
    args = [sys.executable, "-m", "mmt_jax.main", *command,
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    started = []
    for i in range(2):
        logs = (f"{logs_prefix}.{i}.out", f"{logs_prefix}.{i}.err")
        with open(logs[0], "w") as out, open(logs[1], "w") as err:
            started.append((subprocess.Popen(args + [f"--process_id={i}"], env=env, stdout=out,
                                             stderr=err), logs))
    return started


def _finish(started, timeout=400) -> list[str]:
    """Waits for every process (each within `timeout`), then checks they all exited 0. Only a
    process still running after its wait (or a failed wait) is killed: the chief may well be done
    while the other is still writing its last checkpoint."""
    try:
        for process, _ in started:
            process.wait(timeout=timeout)
    finally:
        for process, _ in started:
            process.kill() if process.poll() is None else None
    outputs = []
    for process, (out, err) in started:
        assert process.returncode == 0, open(err).read()[-3000:]
        outputs.append(open(out).read())
    return outputs


def _losses(out: str) -> list[float]:
    return [float(line.split("loss ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("step ") and "/" in line.split()[1]]


def test_two_processes_train_in_lockstep_like_one_process_and_stop_together(data_dir, tmp_path):
    """The two processes run until a SIGTERM to the second one; then their losses and final
    parameters are compared with one process fed the same global batches for as many steps."""
    model_dir = str(tmp_path / "run")
    started = _start(data_dir, model_dir, steps=STEPS)
    chief_out = started[0][1][0]
    deadline = time.time() + 300
    while f"step {SIGNAL_AFTER}/" not in open(chief_out).read():  # training is under way
        assert time.time() < deadline and all(p.poll() is None for p, _ in started)
        time.sleep(0.2)
    started[1][0].send_signal(signal.SIGTERM)
    chief, other = _finish(started)
    assert "2 process(es)" in chief and "over 4 cpu device(s)" in chief
    assert "step " not in other and "finished" not in other  # only the chief reports
    step = int(chief.split("stopped by signal at step ")[1].split(";")[0])
    assert SIGNAL_AFTER <= step < STEPS
    assert store.resolve(model_dir).endswith(f"checkpoint_{step}")  # one checkpoint, both agreed
    two_process = _losses(chief)
    assert len(two_process) == step

    # One process, eight devices, the same global batches: process 0's rows, then process 1's.
    from mmt_jax import tasks
    from mmt_jax.data.images import ImagePreprocessing
    task = tasks.catalog_task("attributes_removed100", "multihost", data_dir, "embedded-n96-s0-px32",
                              image=ImagePreprocessing(size=16))
    config, saved = store.load_checkpoint(model_dir)
    model = build_model(config)
    shards = [get_dataset(model, task, "train", LENGTHS, BATCH, seed=0,
                          shard=(i, 2)).as_numpy_iterator() for i in range(2)]
    first = [next(s) for s in shards]
    shapes = {k: (BATCH,) + v.shape[1:] for k, v in first[0].items()}
    types = {k: v.dtype for k, v in first[0].items()}
    optimizer = optimizers.adamw(optimizers.linear_decay(3e-3, STEPS))  # runs/train.gin's
    trainer = Trainer(model, Partitioner((-1, 1, 1)), optimizer, shapes, types)
    state, _, _ = trainer.initial_state(seed=0)
    one_process = []
    for i in range(step):
        halves = first if i == 0 else [next(s) for s in shards]
        batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
        state, metrics = trainer.train_step(state, trainer.global_batch(batch), jax.random.key(1))
        one_process.append(float(metrics["loss"].compute()))
    np.testing.assert_allclose(two_process, one_process, rtol=2e-5)
    # AdamW normalises each update: a gradient near zero, summed in another order by gloo than by
    # XLA's all-reduce, can move its parameter differently by up to the rate (3e-3) per step; one
    # of 65536 did by 1.04e-4. The losses above are what show lockstep.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3),
                           saved, jax.device_get(state.params))

    # Multi-host inference with that checkpoint: each process predicts its share of the products
    # into its own file; together they are the one-process output.
    import json
    from mmt_jax import main
    validation = os.path.join(data_dir, "product_catalog", "embedded-n96-s0-px32", "*",
                              "product_catalog-validation.tfrecord*")
    infer = ["infer", "--checkpoint", model_dir, "--input", validation, "--prompt", "color:",
             "--prompt", "pattern:", "--input-length", "24", "--target-length", "8"]
    started = _start_processes(infer + ["--out", str(tmp_path / "preds.jsonl")],
                               str(tmp_path / "infer"))
    outputs = _finish(started)
    assert "wrote" in outputs[0] and "preds-00000-of-00002.jsonl" in outputs[0]
    assert main.run(infer + ["--out", str(tmp_path / "one.jsonl")]) == 0
    one = [json.loads(line) for line in open(tmp_path / "one.jsonl")]
    shards = [[json.loads(line) for line in open(tmp_path / f"preds-0000{i}-of-00002.jsonl")]
              for i in range(2)]
    products = list(dict.fromkeys(row["id"] for row in one))
    for i, rows in enumerate(shards):
        assert list(dict.fromkeys(row["id"] for row in rows)) == products[i::2]
    by_key = {(row["id"], row["prompt"]): row for row in one}
    for row in shards[0] + shards[1]:
        expected = by_key.pop((row["id"], row["prompt"]))
        assert row["prediction"] == expected["prediction"]
        assert row["score"] == pytest.approx(expected["score"], abs=1e-4)
    assert not by_key
