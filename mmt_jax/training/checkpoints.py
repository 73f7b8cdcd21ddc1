"""Model checkpoints on disk with orbax: parameters plus the model config that built them.

A checkpoint directory holds two orbax items, `params` (the parameter tree, tensorstore/OCDBT) and
`model_config` (JSON). orbax writes into a temporary directory and renames it when complete, so a
reader never sees a half-written checkpoint and an interrupted save leaves the previous one intact.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmt_jax.models.t5 import T5Config


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(directory: str, params, config: T5Config, *, force: bool = False) -> str:
    """Writes `params` and `config` to `directory` (absolute path) atomically; returns the path."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not force:
        raise FileExistsError(f"{directory}: already exists (pass force=True to replace it)")
    _checkpointer().save(directory, ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(config.to_json_dict())), force=force)
    return directory


def load_checkpoint(directory: str) -> tuple[T5Config, dict]:
    """Reads `(config, params)` back (params as numpy arrays on the host)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    for item in ("params", "model_config"):
        if not os.path.exists(os.path.join(directory, item)):
            raise FileNotFoundError(f"{directory}: not an mmt_jax checkpoint (no '{item}' item)")
    restored = _checkpointer().restore(directory, ocp.args.Composite(
        params=ocp.args.StandardRestore(), model_config=ocp.args.JsonRestore()))
    params = jax.tree_util.tree_map(np.asarray, restored["params"])
    return T5Config.from_json_dict(restored["model_config"]), params
