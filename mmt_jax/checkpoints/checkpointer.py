"""The trainer's checkpoints: orbax CheckpointManager over `model_dir/checkpoint_<step>/`.

Each step directory holds `params` and `model_config` (exactly what `checkpoints.load_checkpoint`
reads, so eval, infer and convert take a training checkpoint as it is), the optimizer state
`opt_state`, `progress` (the step and the number of batches the data pipeline has delivered, which
is where a resumed run starts reading), and `digests.json` (`digests`). orbax writes each
step into `checkpoint_<step>.orbax-checkpoint-tmp` and renames it when every item is written; the
digests are written into that temporary directory just before the rename, so a step directory is
complete and sealed or absent, whatever moment a crash strikes. Saves run in the background while
training goes on. Restoring takes the target shardings, so a checkpoint written on one mesh is read
onto another; a checkpoint whose files no longer match their digests is moved to
`model_dir/corrupt/` and the next older one is taken. One run at a time writes a model_dir
(`model_dir_lock`).
"""
import os

import jax
import orbax.checkpoint as ocp

from mmt_jax.checkpoints import digests, store
from mmt_jax.checkpoints.model_dir_lock import ModelDirLock
from mmt_jax.errors import CorruptCheckpointError
from mmt_jax.models.config import ModelConfig
from mmt_jax.training.train_state import TrainState

ITEMS = ("params", "opt_state", "model_config", "progress")
CORRUPT_DIR = "corrupt"


class Checkpointer:
    """Saves every `period` steps (and when asked), keeps the newest `keep`; a context manager that
    holds the model_dir's lock until `close()`."""

    def __init__(self, model_dir: str, model_config: ModelConfig, period: int, keep: int | None = 3,
                 async_save: bool = True):
        self.model_dir = os.path.abspath(model_dir)
        self.model_config = model_config
        self.period = period
        self.async_save = async_save
        self._saving_step = None
        self._lock = ModelDirLock(self.model_dir) if jax.process_index() == 0 else None
        self.manager = ocp.CheckpointManager(
            self.model_dir, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, step_prefix="checkpoint", enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal), create=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def path(self, step: int) -> str:
        return os.path.join(self.model_dir, f"checkpoint_{step}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, batches_read: int, force: bool = False) -> bool:
        """Starts writing `state` if its step is due (or `force`); returns whether it did."""
        step = int(jax.device_get(state.step))
        if (not force and step % self.period) or step in self.manager.all_steps():
            return False
        self.manager.wait_until_finished()  # one save in flight, so `_seal` knows which it is
        self._saving_step = step
        started = self.manager.save(step, force=force, args=store.saved_items(
            state.params, self.model_config, opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.JsonSave({"step": step, "batches_read": batches_read})))
        if not self.async_save:
            self.wait()
        return started

    def _seal(self) -> None:
        """orbax's post-finalization callback (process 0, background thread): every item of
        `_saving_step` is written to its temporary directory, which is renamed right after."""
        temporary = self.path(self._saving_step) + ocp.utils.TMP_DIR_SUFFIX
        if not os.path.isdir(temporary):
            raise RuntimeError(f"orbax committed no {temporary}; its temporary layout changed, so "
                               "checkpoints cannot be sealed (pin orbax-checkpoint as setup.py does)")
        digests.seal(temporary)

    def restore(self, abstract_state: TrainState, shardings: TrainState, step: int | None = None,
                say=print) -> tuple[TrainState, dict]:
        """The state at `step` (default: the newest checkpoint that verifies) placed with
        `shardings`, and its progress. A corrupt checkpoint met on the way is moved to
        `model_dir/corrupt/` and reported with `say`; a named `step` that is corrupt raises."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.model_dir}: no checkpoint to restore")
        for candidate in steps:
            try:
                verified = digests.verify(self.path(candidate))
            except CorruptCheckpointError as e:
                if step is not None:
                    raise
                say(f"{e}; moved it to {self._quarantine(candidate)} and trying the one before")
                continue
            with digests.reading(self.path(candidate), verified):
                return self._restore(candidate, abstract_state, shardings)
        raise CorruptCheckpointError(self.model_dir, "checkpoint_*",
                                     f"none of steps {steps} verifies (all moved to {CORRUPT_DIR}/)")

    def _restore(self, step, abstract_state, shardings):
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            progress=ocp.args.JsonRestore()))
        progress = restored["progress"]
        state = abstract_state.replace(
            step=jax.device_put(jax.numpy.asarray(progress["step"], jax.numpy.int32), shardings.step),
            params=restored["params"], opt_state=restored["opt_state"])
        return state, progress

    def _quarantine(self, step: int) -> str:
        """Moves `checkpoint_<step>` out of orbax's sight (kept for inspection, never deleted)."""
        corrupt = os.path.join(self.model_dir, CORRUPT_DIR)
        os.makedirs(corrupt, exist_ok=True)
        destination, n = os.path.join(corrupt, f"checkpoint_{step}"), 1
        while os.path.exists(destination):
            destination, n = os.path.join(corrupt, f"checkpoint_{step}.{n}"), n + 1
        os.replace(self.path(step), destination)
        self.manager.reload()
        return destination

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
