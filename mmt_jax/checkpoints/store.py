"""Model checkpoints on disk with orbax: parameters plus the model config that built them.

A checkpoint directory holds two orbax items, `params` (the parameter tree, tensorstore/OCDBT) and
`model_config` (`models.config.ModelConfig` as JSON), and `digests.json` (`digests`); the
trainer's `checkpoint_<step>` directories hold the same beside the optimizer state, so every reader
here reads those too. A checkpoint is written beside its destination, sealed, and renamed into
place, so a reader never sees a half-written one and an interrupted save leaves the previous one
intact. Reading verifies the digests first: a truncated or altered file is an error naming the
checkpoint and the file, never a silently different model. (Checkpoints written before digests
existed have none and are read unverified.)
"""
import functools
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
# Not exported by orbax (pinned in setup.py): the metadata store its default array handler writes.
from orbax.checkpoint._src.metadata import array_metadata_store

from mmt_jax.checkpoints import digests
from mmt_jax.layers import layer_stack
from mmt_jax.models.config import ModelConfig


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


@functools.cache
def _array_writing_for_backend() -> None:
    """On XLA:CPU, each array is written whole from the first device that holds it. orbax's
    default elsewhere than GPU splits a replicated array between its replicas ("replica-parallel"),
    which on one host's CPU devices writes no faster and compiles a slicing program per array
    shape (72 programs, 3 s, at the first save of a tiny MMT4). GPU and TPU keep orbax's choice."""
    if jax.default_backend() == "cpu":
        absl = logging.getLogger("absl")  # orbax warns that its default is overridden: meant here
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(
                    use_replica_parallel=False,
                    array_metadata_store=array_metadata_store.Store()), override=True)
        finally:
            absl.setLevel(level)


def saved_items(params, config: ModelConfig, **more) -> ocp.args.Composite:
    """What every checkpoint holds, for orbax to write: `params` and `model_config`, and the
    trainer's `more` items (`checkpointer.Checkpointer`: the optimizer state and progress)."""
    _array_writing_for_backend()
    return ocp.args.Composite(params=ocp.args.StandardSave(params),
                              model_config=ocp.args.JsonSave(config.to_json_dict()), **more)


def save_checkpoint(directory: str, params, config: ModelConfig, *, force: bool = False) -> str:
    """Writes `params` and `config` to `directory` atomically (an existing one is replaced only
    with `force`, and only once the new one is complete); returns the absolute path."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory}: already exists (pass force=True to replace it)")
    staging = f"{directory}.writing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _checkpointer().save(staging, saved_items(params, config))
        digests.seal(staging)
        if os.path.exists(directory):
            replaced = f"{directory}.replaced-{os.getpid()}"
            os.replace(directory, replaced)
            os.replace(staging, directory)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def resolve(directory: str) -> str:
    """`directory` itself when it is a checkpoint, else the newest `checkpoint_<step>` in it (a
    training run's model_dir); FileNotFoundError when it is neither."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    if os.path.exists(os.path.join(directory, "params")):
        return directory
    steps = [int(name.split("_")[1]) for name in os.listdir(directory)
             if name.startswith("checkpoint_") and name.split("_")[1].isdigit()]
    if not steps:
        raise FileNotFoundError(f"{directory}: neither a checkpoint nor a model directory with "
                                "checkpoint_<step> subdirectories")
    return os.path.join(directory, f"checkpoint_{max(steps)}")


def load_checkpoint(directory: str) -> tuple[ModelConfig, dict]:
    """Reads `(config, params)` back (params as numpy arrays on the host) from a checkpoint, or from
    the newest one of a model directory (`resolve`)."""
    directory = _checked(directory)
    with digests.reading(directory, digests.verify(directory)):
        # Read every array onto this host's first device whatever mesh wrote it (without a target,
        # orbax insists on the saving topology, e.g. the 2 processes x 2 devices of a multi-host run).
        # The item's handler, not a Checkpointer: one warns that a sub-item has no step metadata.
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / "params")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            getattr(metadata, "tree", metadata))
        restored = _checkpointer().restore(directory, ocp.args.Composite(
            params=ocp.args.StandardRestore(target), model_config=ocp.args.JsonRestore()))
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    return ModelConfig.from_json_dict(restored["model_config"]), params


def load_config(directory: str) -> ModelConfig:
    """The ModelConfig of a checkpoint (or of a model directory's newest), without its params."""
    directory = _checked(directory)
    with digests.reading(directory, digests.verify(directory)):
        restored = _checkpointer().restore(directory, ocp.args.Composite(
            model_config=ocp.args.JsonRestore()))
    return ModelConfig.from_json_dict(restored["model_config"])


def _checked(directory: str) -> str:
    """`resolve(directory)`, which must hold both items of a checkpoint."""
    directory = resolve(directory)
    for item in ("params", "model_config"):
        if not os.path.exists(os.path.join(directory, item)):
            raise FileNotFoundError(f"{directory}: not an mmt_jax checkpoint (no '{item}' item)")
    return directory


def initialize_from(fresh_params, pretrained_params):
    """Takes every parameter the pretrained tree has (same path, same shape) and keeps the fresh
    initialisation for the rest, e.g. MMT4's image branch and cross-segment bias on a text-only T5.

    Sparse upcycling: an MoE expert kernel `.../mlp/expert/W` [experts, ...] whose dense
    counterpart `.../mlp/W` is pretrained starts as that kernel in every expert; the router starts
    fresh. MoEMoE from one T5 (`models/moemoe.py`): its `question_encoder/...` and the encoders of
    its further text sources (`<name>_encoder/...`), absent from the pretrained tree, start as the
    pretrained `encoder/...` (the context's).

    Either tree may be scanned (`T5Config.scan_layers`): both are matched unrolled, with unrolled
    names, and the result comes back in the fresh tree's layout (layers/layer_stack.py).

    Returns `(params, fresh_paths, derived_paths)` ('/'-joined; derived: upcycled or copied from
    another pretrained path). A path in both trees with
    different shapes, or a pretrained path the model lacks, is an error naming it.
    """
    fresh = traverse_util.flatten_dict(layer_stack.unscanned(fresh_params), sep="/")
    pretrained = traverse_util.flatten_dict(layer_stack.unscanned(pretrained_params), sep="/")

    def source_of(path: str) -> str | None:
        """The pretrained parameter a fresh one without its own starts from, if any."""
        top, _, rest = path.partition("/")
        if top.endswith("_encoder") and top != "image_encoder":  # MoEMoE's other text encoders
            path = "encoder/" + rest
        for candidate in (path, path.replace("/mlp/expert/", "/mlp/")):
            if candidate in pretrained:
                return candidate
        return None

    derived = {path: source_of(path) for path in fresh if path not in pretrained}
    derived = {path: source for path, source in derived.items() if source is not None}
    unused = sorted(set(pretrained) - set(fresh) - set(derived.values()))
    if unused:
        raise ValueError(f"pretrained parameter {unused[0]} (and {len(unused) - 1} more) has no "
                         "place in this model")
    merged, fresh_paths = {}, []
    for path, value in fresh.items():
        source = path if path in pretrained else derived.get(path)
        if source is None:
            merged[path] = value
            fresh_paths.append(path)
            continue
        weights = np.asarray(pretrained[source], np.asarray(value).dtype)
        upcycled = "/mlp/expert/" in path and "/mlp/expert/" not in source
        needed = np.shape(value)[1:] if upcycled else np.shape(value)
        if weights.shape != needed:
            raise ValueError(f"pretrained parameter {source} has shape {weights.shape}; "
                             f"{path} needs {needed}")
        merged[path] = np.broadcast_to(weights, np.shape(value)).copy() if upcycled else weights
    merged = layer_stack.scanned(traverse_util.unflatten_dict(merged, sep="/"), fresh_params)
    return merged, sorted(fresh_paths), sorted(derived)
