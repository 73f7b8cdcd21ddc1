"""Checkpoints that were altered after writing are named, never loaded; one run per model_dir.

Faults are made the way disks and people make them: a parameter file cut short, a few bytes flipped
in place, a file deleted; the checkpoints themselves are written by the real save paths."""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from mmt_jax import main
from mmt_jax.errors import CorruptCheckpointError, ModelDirInUseError
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.t5 import t5_config
from mmt_jax.checkpoints import digests, store
from mmt_jax.checkpoints.checkpointer import Checkpointer
from mmt_jax.training.train_state import TrainState

CONFIG = ModelConfig(t5_config("tiny", vocab_size=64, num_encoder_layers=1, num_decoder_layers=1))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"encoder": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
            "token_embedder": {"embedding": rng.normal(size=(64, 16)).astype(np.float32)}}


def _largest_file(directory, under="params"):
    files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(directory, under))
             for name in names]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path, count=4):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in np.random.default_rng(1).choice(len(data), count, replace=False):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


@pytest.fixture
def checkpoint(tmp_path):
    return store.save_checkpoint(str(tmp_path / "ckpt"), _params(), CONFIG)


def test_a_saved_checkpoint_is_sealed_and_loads(checkpoint):
    assert digests.verify(checkpoint)
    config, params = store.load_checkpoint(checkpoint)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, _params())
    assert not [n for n in os.listdir(os.path.dirname(checkpoint)) if n != "ckpt"]  # no staging


@pytest.mark.parametrize("fault", ["truncated", "flipped", "deleted"])
def test_an_altered_file_is_named(checkpoint, fault, capsys, tmp_path):
    victim = _largest_file(checkpoint)
    {"truncated": _truncate, "flipped": _flip_bytes, "deleted": os.remove}[fault](victim)
    with pytest.raises(CorruptCheckpointError) as e:
        store.load_checkpoint(checkpoint)
    relative = os.path.relpath(victim, checkpoint)
    assert e.value.file == relative and e.value.checkpoint == checkpoint
    # The binaries say it in one line, exit 2.
    assert main.run(["convert", "--from-checkpoint", checkpoint, "--to-hf",
                     str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and relative in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "hf")


def test_an_unsealed_unreadable_checkpoint_is_one_error(checkpoint):
    """Checkpoints written before digests existed are read unverified; a broken one still gives a
    CorruptCheckpointError, not orbax's traceback."""
    os.remove(os.path.join(checkpoint, digests.MANIFEST))
    _truncate(_largest_file(checkpoint))
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        store.load_checkpoint(checkpoint)


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_whole(checkpoint,
                                                                             monkeypatch):
    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(digests, "seal", fail)
    with pytest.raises(OSError):
        store.save_checkpoint(checkpoint, _params(1), CONFIG, force=True)
    monkeypatch.undo()
    _, params = store.load_checkpoint(checkpoint)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, _params())
    assert sorted(os.listdir(os.path.dirname(checkpoint))) == ["ckpt"]
    store.save_checkpoint(checkpoint, _params(1), CONFIG, force=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, store.load_checkpoint(checkpoint)[1],
                           _params(1))


def _state(value):
    params = jax.tree_util.tree_map(lambda x: np.full_like(x, value), _params())
    tx = optax.sgd(0.1)
    return TrainState(step=np.asarray(int(value), np.int32), params=params,
                      opt_state=tx.init(params), tx=tx)


def test_restore_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    model_dir = str(tmp_path / "run")
    with Checkpointer(model_dir, CONFIG, period=1) as checkpointer:
        for step in (1, 2, 3):
            assert checkpointer.save(_state(step), batches_read=step)
    for step in (1, 2, 3):  # sealed inside orbax's temporary directory, still whole after the rename
        assert digests.verify(os.path.join(model_dir, f"checkpoint_{step}"))
    _flip_bytes(_largest_file(os.path.join(model_dir, "checkpoint_3")))
    _truncate(_largest_file(os.path.join(model_dir, "checkpoint_2"), under="opt_state"))
    abstract = _state(0)
    shardings = jax.tree_util.tree_map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    said = []
    with Checkpointer(model_dir, CONFIG, period=1) as checkpointer:
        state, progress = checkpointer.restore(abstract, shardings, say=said.append)
        assert progress == {"step": 1, "batches_read": 1} and checkpointer.latest_step() == 1
        # a save of step 2 after the fallback writes a new checkpoint_2
        assert checkpointer.save(_state(2), batches_read=2)
    assert float(state.params["encoder"]["kernel"][0, 0]) == 1.0
    assert len(said) == 2 and "checkpoint_3 is corrupt" in said[0] and "checkpoint_2" in said[1]
    assert sorted(os.listdir(os.path.join(model_dir, "corrupt"))) == ["checkpoint_2", "checkpoint_3"]
    assert digests.verify(os.path.join(model_dir, "checkpoint_2"))


def test_saving_a_replicated_state_on_cpu_compiles_nothing(tmp_path, caplog):
    """On XLA:CPU every array is written whole from one device (store.py): orbax's default would
    split each replicated array between the 8 devices, compiling a slicing program per shape. The
    switch logs nothing (a run's stderr stays the user's)."""
    store._array_writing_for_backend.cache_clear()  # as at a process's first save
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(_state(1), replicated)
    assert jax.device_count() == 8 and len(state.params["encoder"]["kernel"].sharding.device_set) == 8
    compiles = []
    listener = lambda event, seconds, **kwargs: compiles.append(event) if "compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with Checkpointer(str(tmp_path / "run"), CONFIG, period=1) as checkpointer:
            assert checkpointer.save(state, batches_read=1)
            checkpointer.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert not [r for r in caplog.records if "overriding" in r.getMessage()]
    _, params = store.load_checkpoint(str(tmp_path / "run" / "checkpoint_1"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, _state(1).params)


def test_one_run_per_model_dir_and_no_stale_lock_after_a_kill(tmp_path):
    model_dir = str(tmp_path / "run")
    with Checkpointer(model_dir, CONFIG, period=1):
        with pytest.raises(ModelDirInUseError, match=f"process {os.getpid()}"):
            Checkpointer(model_dir, CONFIG, period=1)
    Checkpointer(model_dir, CONFIG, period=1).close()  # released on close
    # A holder killed with SIGKILL leaves no stale lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mmt_jax.checkpoints.model_dir_lock import "
         "ModelDirLock; ModelDirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
         model_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ModelDirInUseError, match=f"process {holder.pid}"):
            Checkpointer(model_dir, CONFIG, period=1)
    finally:
        holder.kill()
        holder.wait()
    Checkpointer(model_dir, CONFIG, period=1).close()
