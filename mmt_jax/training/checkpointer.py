"""The trainer's checkpoints: orbax CheckpointManager over `model_dir/checkpoint_<step>/`.

Each step directory holds `params` and `model_config` (exactly what `checkpoints.load_checkpoint`
reads, so eval, infer and convert take a training checkpoint as it is), the optimizer state
`opt_state`, and `progress` (the step and the number of batches the data pipeline has delivered,
which is where a resumed run starts reading). orbax writes each step into a temporary directory and
renames it when every item is written, so a crash never leaves a half checkpoint that looks whole;
saves run in the background while training goes on. Restoring takes the target shardings, so a
checkpoint written on one mesh is read onto another.
"""
import os

import jax
import orbax.checkpoint as ocp

from mmt_jax.models.config import ModelConfig
from mmt_jax.training.train_state import TrainState

ITEMS = ("params", "opt_state", "model_config", "progress")


class Checkpointer:
    """Saves every `period` steps (and when asked), keeps the newest `keep`."""

    def __init__(self, model_dir: str, model_config: ModelConfig, period: int, keep: int | None = 3,
                 async_save: bool = True):
        self.model_dir = os.path.abspath(model_dir)
        self.model_config = model_config
        self.period = period
        self.manager = ocp.CheckpointManager(
            self.model_dir, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, step_prefix="checkpoint", enable_async_checkpointing=async_save,
                create=True))

    def path(self, step: int) -> str:
        return os.path.join(self.model_dir, f"checkpoint_{step}")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, batches_read: int, force: bool = False) -> bool:
        """Starts writing `state` if its step is due (or `force`); returns whether it did."""
        step = int(jax.device_get(state.step))
        if (not force and step % self.period) or step in self.manager.all_steps():
            return False
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            model_config=ocp.args.JsonSave(self.model_config.to_json_dict()),
            progress=ocp.args.JsonSave({"step": step, "batches_read": batches_read})))

    def restore(self, abstract_state: TrainState, shardings: TrainState,
                step: int | None = None) -> tuple[TrainState, dict]:
        """The state at `step` (default: the latest) placed with `shardings`, and its progress."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.model_dir}: no checkpoint to restore")
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

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
