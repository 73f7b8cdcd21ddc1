"""t5x checkpoints -> our parameter tree, on CPU, without t5x, sharding or mesh information.

t5x saves `train_state.state_dict()`, i.e. `{'target': <params>, 'state': {'step': int32[],
'param_states': <optimizer slots per param>}}`, into `<model_dir>/checkpoint_<step>/` in one of two
layouts:

ORBAX (t5x's default, `train(use_orbax=True)`): `checkpoint_<step>/_CHECKPOINT_METADATA` (written by
  orbax's CheckpointManager, `step_prefix='checkpoint'`) and `checkpoint_<step>/state/`, the whole
  state dict written by orbax's `PyTreeCheckpointHandler(use_ocdbt=True)`: `_METADATA` (tree
  structure, shapes, dtypes), `manifest.ocdbt` and `ocdbt.process_*/` (the array data).
Legacy T5X (`VERSION = 3`): `checkpoint_<step>/checkpoint`, a msgpack file (flax's encoding, numpy
  arrays as extension types) holding `{'version': 3, 'optimizer': <state dict>}`. Partitioned
  arrays (all model parameters under t5x's partitioners) are replaced there by the JSON of a
  TensorStore spec, `{'driver': 'zarr', 'dtype': ..., 'kvstore': {'driver': 'file', 'path':
  'target.encoder.layers_0.attention.key.kernel'}, 'metadata': {'shape': ..., 'chunks': ...,
  'compressor': ...}}`, whose path is relative to `checkpoint_<step>/`, where each array is a zarr
  directory; other arrays (step, factored Adafactor slots) are stored in the msgpack itself.

Only `target` is read; optimizer state is skipped. Arrays come back as float32 numpy arrays (t5x
may save parameters as bfloat16). The tree has t5x's T5.1.1 names, which are ours (see
`mmt_jax/models/t5.py`): `config_from_t5x_params` infers the sizes, `check_params` validates.
"""
import os
import re
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import serialization, traverse_util

from mmt_jax.models.t5 import T5Config, param_shapes
from mmt_jax.errors import CheckpointFormatError

MSGPACK_FILE = "checkpoint"  # legacy layout
ORBAX_STATE_DIR = "state"  # orbax layout
_STEP_DIR = re.compile(r"checkpoint_(\d+)")  # t5x's own pattern; excludes `.tmp-*`/orbax tmp dirs
_TS_SPEC_KEYS = {"driver", "kvstore", "metadata"}  # how t5x recognises a serialised ts.Spec


def checkpoint_dir(path: str) -> str:
    """`path` if it is a `checkpoint_<step>` directory (either layout), else its latest one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory; expected a t5x checkpoint_<step> "
                                "directory or a model dir holding them")
    if (os.path.isfile(os.path.join(path, MSGPACK_FILE))
            or os.path.isdir(os.path.join(path, ORBAX_STATE_DIR))):
        return path
    steps = [(int(m.group(1)), name) for name in os.listdir(path)
             if (m := _STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(path, name))]
    if not steps:
        raise FileNotFoundError(
            f"{path}: not a t5x checkpoint (no `{MSGPACK_FILE}` msgpack file, no orbax "
            f"`{ORBAX_STATE_DIR}/` directory) and no checkpoint_<step> directories in it")
    return os.path.join(path, max(steps)[1])


def _read_orbax_target(state_dir: str) -> dict:
    """Restores only `target` from an orbax PyTree checkpoint, as host numpy arrays."""
    # orbax handlers take absolute paths, not str ("Checkpoint path should be absolute")
    directory = epath.Path(os.path.abspath(state_dir))
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(directory).tree
        if "target" not in tree:
            raise CheckpointFormatError(
                f"{state_dir}: no `target` in the checkpoint tree (found {sorted(tree)})")
        item = {"target": tree["target"]}
        # Restoring as np.ndarray needs no sharding, whatever mesh the checkpoint was written on.
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return handler.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))["target"]
    finally:
        handler.close()


def _read_msgpack_target(ckpt_dir: str) -> dict:
    """Reads `target` from a legacy t5x checkpoint: inline arrays and per-array zarr directories."""
    msgpack_path = os.path.join(ckpt_dir, MSGPACK_FILE)
    with open(msgpack_path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"model_checkpoint_path"):
        raise CheckpointFormatError(f"{msgpack_path}: a TensorFlow checkpoint index, not t5x's")
    contents = serialization.msgpack_restore(raw)
    optimizer = contents.get("optimizer") if isinstance(contents, dict) else None
    if not isinstance(optimizer, dict) or "target" not in optimizer:
        raise CheckpointFormatError(f"{msgpack_path}: not a t5x checkpoint (expected a msgpack map "
                                    "{'version': 3, 'optimizer': {'target': ..., 'state': ...}})")
    flat = traverse_util.flatten_dict(optimizer["target"], sep="/",
                                      is_leaf=lambda _, v: _TS_SPEC_KEYS <= set(v))
    opened = {}
    for name, value in flat.items():
        if isinstance(value, dict):  # a ts.Spec written by t5x
            # Written locally or on GCS (`gcs` kvstore, dummy bucket), the path is relative to the
            # checkpoint dir; tensorstore < 0.1.14 kept it at the top level of the spec.
            relative = value["kvstore"].get("path") or value["path"]
            spec = {"driver": value["driver"],
                    "kvstore": {"driver": "file", "path": os.path.join(ckpt_dir, relative)}}
            opened[name] = ts.open(spec, open=True, read=True)
    reads = {name: future.result().read() for name, future in opened.items()}
    for name, future in reads.items():
        flat[name] = future.result()
        if flat[name].dtype == np.uint16:  # t5x checkpoint version 2 stored bfloat16 as uint16
            raise CheckpointFormatError(f"{msgpack_path}: {name} is uint16; t5x version-2 "
                                        "bfloat16 encoding is not supported")
    return traverse_util.unflatten_dict(flat, sep="/")


def load_t5x_params(path: str) -> dict:
    """The `target` (parameter) tree of a t5x checkpoint as nested float32 numpy arrays.

    `path` is a `checkpoint_<step>` directory in the orbax or the legacy layout, or a model dir, in
    which case the checkpoint with the largest step is read.
    """
    directory = checkpoint_dir(path)
    if os.path.isfile(os.path.join(directory, MSGPACK_FILE)):
        target = _read_msgpack_target(directory)
    else:
        target = _read_orbax_target(os.path.join(directory, ORBAX_STATE_DIR))
    return jax.tree.map(lambda x: np.asarray(x, np.float32), target)


def _shape(flat: Mapping[str, np.ndarray], path: str) -> tuple[int, ...]:
    if path not in flat:
        raise CheckpointFormatError(f"parameter {path} is missing; not a t5x T5 encoder-decoder tree")
    return tuple(np.shape(flat[path]))


def config_from_t5x_params(params: Mapping, num_heads: int | None = None, **overrides) -> T5Config:
    """Infers `T5Config` from parameter shapes; `overrides` set the rest (e.g. dropout, max distance).

    Attention kernels are `[embed, heads * head_dim]`; the head count is read from
    `encoder/relpos_bias/rel_embedding [heads, buckets]`, and checked against `num_heads` if given. `mlp/wi` means the original T5
    (ReLU), `mlp/wi_0` + `mlp/wi_1` T5.1.1 (gated GELU); no `decoder/logits_dense` means tied logits.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    vocab_size, emb_dim = _shape(flat, "token_embedder/embedding")
    joined_kv = _shape(flat, "encoder/layers_0/attention/query/kernel")[1]
    heads, buckets = _shape(flat, "encoder/relpos_bias/rel_embedding")
    num_heads = heads if num_heads is None else num_heads
    if num_heads <= 0 or joined_kv % num_heads:
        raise CheckpointFormatError(
            f"encoder/layers_0/attention/query/kernel has {joined_kv} = heads * head_dim columns, "
            f"not divisible by num_heads={num_heads}")
    if heads != num_heads:
        raise CheckpointFormatError(
            f"encoder/relpos_bias/rel_embedding has shape {(heads, buckets)}: the checkpoint has "
            f"{heads} heads, not num_heads={num_heads}")
    wi = sorted(k.split("/")[3] for k in flat if re.fullmatch(r"encoder/layers_0/mlp/wi\w*/kernel", k))
    activations = {("wi",): ("relu",), ("wi_0", "wi_1"): ("gelu", "linear")}.get(tuple(wi))
    if activations is None and "mlp_activations" not in overrides:
        raise CheckpointFormatError(
            f"encoder/layers_0/mlp has input kernels {wi}; pass mlp_activations= explicitly")
    count = lambda stack: len({k.split("/")[1] for k in flat  # noqa: E731
                               if re.match(rf"{stack}/layers_\d+/", k)})
    fields = dict(
        vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads,
        head_dim=joined_kv // num_heads, mlp_dim=_shape(flat, "encoder/layers_0/mlp/wo/kernel")[0],
        num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
        mlp_activations=activations, logits_via_embedding="decoder/logits_dense/kernel" not in flat,
        relative_attention_num_buckets=buckets)
    fields.update(overrides)
    return T5Config(**fields)


def check_params(params: Mapping, config: T5Config) -> None:
    """Raises `CheckpointFormatError` naming the first missing, mis-shaped or unknown parameter.

    The expected tree is `EncoderDecoder(config)`'s `params` collection (shapes only, no compute).
    """
    expected = param_shapes(config)
    found = traverse_util.flatten_dict(params, sep="/")
    for path, want in expected.items():
        if path not in found:
            raise CheckpointFormatError(f"parameter {path} {want} is missing from the checkpoint")
        if tuple(np.shape(found[path])) != want:
            raise CheckpointFormatError(f"parameter {path}: expected shape {want}, found "
                                        f"{tuple(np.shape(found[path]))}")
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise CheckpointFormatError(f"parameter {unknown[0]} (and {len(unknown) - 1} more) is not "
                                    "part of the model for this config; unknown tensor")


def load_t5x(path: str, num_heads: int | None = None, **overrides) -> tuple[T5Config, dict]:
    """`load_t5x_params` + `config_from_t5x_params` + `check_params`: (config, nested params)."""
    params = load_t5x_params(path)
    config = config_from_t5x_params(params, num_heads, **overrides)
    check_params(params, config)
    return config, params
