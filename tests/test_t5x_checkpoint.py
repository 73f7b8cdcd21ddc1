"""t5x checkpoint import: tiny T5s written in both layouts t5x writes, read back without t5x.

The writers below follow t5x's `t5x/checkpoints.py`: `OrbaxCheckpointManagerInterface.save` (an orbax
CheckpointManager with `step_prefix='checkpoint'` and an OCDBT PyTree handler under `state`) and the
legacy `Checkpointer.save` (`{'version': 3, 'optimizer': ...}` in msgpack, partitioned arrays as zarr
directories named by their '.'-joined path, referenced by relative TensorStore specs).
"""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmt_jax.models.t5 import EncoderDecoder, t5_config
from mmt_jax.checkpoints import t5x_checkpoint
from mmt_jax.errors import CheckpointFormatError

SIZES = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=2,
             num_decoder_layers=1, relative_attention_num_buckets=8)


def init_params(config, seed=0):
    """Random parameters in the module's tree (numpy from its shapes: no per-op compiles)."""
    tokens = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: EncoderDecoder(config).init(jax.random.key(0), tokens, tokens))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])


def adafactor_slots(param):
    """t5x Adafactor's per-parameter state (`adafactor.py` `init_param_state`, beta1=None):
    unused slots are `zeros((1,))`; rank>=2 parameters keep factored `v_row`/`v_col`."""
    dummy = np.zeros((1,), np.float32)
    if param.ndim < 2:
        return {"m": dummy, "v": np.zeros(param.shape, np.float32), "v_row": dummy, "v_col": dummy}
    small, large = np.argsort(param.shape)[-2:]
    return {"m": dummy, "v": dummy, "v_row": np.zeros(np.delete(param.shape, large), np.float32),
            "v_col": np.zeros(np.delete(param.shape, small), np.float32)}


def state_dict(params, step):
    """What t5x's `FlaxOptimTrainState.state_dict()` holds for Adafactor."""
    return {"target": params, "state": {"step": np.array(step, np.int32),
                                        "param_states": jax.tree.map(adafactor_slots, params)}}


def save_orbax(model_dir, step, params, save_dtype=None):
    """As t5x's orbax manager: params sharded on a mesh, `SaveArgs(dtype)` on `target` only."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))

    def shard(x):
        spec = PartitionSpec(None, "model") if x.ndim == 2 and x.shape[1] % 2 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    state = jax.tree.map(shard, state_dict(params, step))
    dtype = save_dtype and np.dtype(save_dtype)
    save_args = {"target": jax.tree.map(lambda _: ocp.SaveArgs(dtype=dtype), params),
                 "state": jax.tree.map(lambda _: ocp.SaveArgs(), state["state"])}
    manager = ocp.CheckpointManager(
        model_dir, options=ocp.CheckpointManagerOptions(step_prefix="checkpoint",
                                                        cleanup_tmp_directories=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)})
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state, save_args=save_args)),
                 force=True)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(model_dir, f"checkpoint_{step}")


def save_legacy(model_dir, step, params, save_dtype=None, inline=(), gcs=False):
    """As t5x's legacy `Checkpointer.save`: arrays with mesh axes (all parameters, unfactored `v`) go
    to zarr with a relative spec in the msgpack; the others (step, factored/dummy slots, and
    parameters named in `inline`, as for a parameter without axes) are stored in the msgpack.
    `gcs=True` records the spec t5x writes under gs:// (then copied here, as public checkpoints are)."""
    directory = os.path.join(model_dir, f"checkpoint_{step}")
    os.makedirs(directory)
    flat = traverse_util.flatten_dict(state_dict(params, step), sep="/")
    for name, arr in flat.items():
        is_target = name.startswith("target/")
        dtype = save_dtype if is_target and save_dtype else arr.dtype
        partitioned = (is_target and name[len("target/"):] not in inline) or (
            name.endswith(("/v", "/m")) and arr.shape != (1,))
        if not partitioned:
            flat[name] = arr.astype(dtype)
            continue
        array_dir = name.replace("/", ".")
        metadata = {"compressor": {"id": "zstd"}, "shape": list(arr.shape), "chunks": list(arr.shape)}
        absolute = {"driver": "zarr", "dtype": np.dtype(dtype).name, "metadata": metadata,
                    "kvstore": {"driver": "file", "path": os.path.join(directory, array_dir)}}
        spec = (dict(absolute, kvstore={"driver": "gcs", "bucket": "t5x-dummy-bucket"}, path=array_dir)
                if gcs else dict(absolute, kvstore={"driver": "file", "path": array_dir}))
        if dtype != arr.dtype:
            absolute = {"base": absolute, "driver": "cast", "dtype": arr.dtype.name}
        ts.open(absolute, create=True, open=True).result().write(arr).result()
        flat[name] = ts.Spec(spec).to_json()
    contents = {"version": 3, "optimizer": traverse_util.unflatten_dict(flat, sep="/")}
    with open(os.path.join(directory, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(contents))
    return directory


def assert_trees_equal(actual, expected):
    actual = traverse_util.flatten_dict(actual, sep="/")
    expected = traverse_util.flatten_dict(expected, sep="/")
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == np.float32, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


@pytest.fixture(scope="module", params=["t5_1_1", "t5"])
def model(request):
    config = t5_config("tiny", request.param, **SIZES)
    return config, init_params(config)


SAVERS = {
    "orbax": save_orbax,
    "legacy": lambda d, s, p, dt=None: save_legacy(d, s, p, dt, inline=("encoder/encoder_norm/scale",)),
    "legacy_gcs": lambda d, s, p, dt=None: save_legacy(d, s, p, dt, gcs=True),
}


@pytest.mark.parametrize("layout", SAVERS)
def test_round_trip_and_config(model, layout, tmp_path):
    config, params = model
    directory = SAVERS[layout](str(tmp_path), 7, params)
    loaded = t5x_checkpoint.load_t5x_params(directory)
    assert_trees_equal(loaded, params)
    assert t5x_checkpoint.config_from_t5x_params(loaded, num_heads=2) == config
    assert t5x_checkpoint.config_from_t5x_params(loaded) == config  # heads read from relpos_bias
    t5x_checkpoint.check_params(loaded, config)


def test_on_disk_layouts_are_t5x(model, tmp_path):
    _, params = model
    orbax_dir = save_orbax(str(tmp_path / "o"), 7, params)
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt"):
        assert os.path.exists(os.path.join(orbax_dir, name)), name
    legacy_dir = save_legacy(str(tmp_path / "l"), 7, params)
    assert os.path.isfile(os.path.join(legacy_dir, "target.encoder.layers_0.attention.key.kernel",
                                       ".zarray"))
    with open(os.path.join(legacy_dir, "checkpoint"), "rb") as f:
        contents = serialization.msgpack_restore(f.read())
    assert set(contents) == {"version", "optimizer"} and contents["version"] == 3
    assert int(contents["optimizer"]["state"]["step"]) == 7


@pytest.mark.parametrize("layout", SAVERS)
def test_bfloat16_checkpoint_loads_as_float32(model, layout, tmp_path):
    _, params = model
    directory = SAVERS[layout](str(tmp_path), 7, params, ml_dtypes.bfloat16)
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert_trees_equal(t5x_checkpoint.load_t5x_params(directory), rounded)


def test_model_dir_takes_latest_step(model, tmp_path):
    config, params = model
    newer = init_params(config, seed=1)
    save_legacy(str(tmp_path), 3, params)
    save_orbax(str(tmp_path), 12, newer)  # 12 > 3 numerically, not as text
    os.makedirs(tmp_path / "checkpoint_20.tmp-1700000000")  # an unfinished t5x save: ignored
    assert t5x_checkpoint.checkpoint_dir(str(tmp_path)) == str(tmp_path / "checkpoint_12")
    assert_trees_equal(t5x_checkpoint.load_t5x_params(str(tmp_path)), newer)


def test_loaded_params_give_the_same_logits(model, tmp_path):
    config, params = model
    save_orbax(str(tmp_path), 7, params)
    loaded_config, loaded = t5x_checkpoint.load_t5x(str(tmp_path), num_heads=2)
    rng = np.random.default_rng(0)
    enc = rng.integers(1, config.vocab_size, (2, 6)).astype(np.int32)
    dec = rng.integers(1, config.vocab_size, (2, 5)).astype(np.int32)
    # The config is a static argument: equal configs share one compilation.
    logits = jax.jit(lambda cfg, p: EncoderDecoder(cfg).apply({"params": p}, enc, dec),
                     static_argnums=0)
    original, restored = logits(config, params), logits(loaded_config, loaded)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))


def test_missing_or_empty_directory(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        t5x_checkpoint.load_t5x_params(missing)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a t5x checkpoint"):
        t5x_checkpoint.load_t5x_params(str(tmp_path))


def test_wrong_shape_names_the_parameter(model, tmp_path):
    config, params = model
    bad = jax.tree.map(lambda x: x, params)
    bad["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] = np.zeros((33, 16), np.float32)
    save_legacy(str(tmp_path), 1, bad)
    expected = r"decoder/layers_0/mlp/wo/kernel: expected shape \(32, 16\), found \(33, 16\)"
    with pytest.raises(CheckpointFormatError, match=expected):
        t5x_checkpoint.load_t5x(str(tmp_path), num_heads=2)


def test_missing_and_unknown_tensors(model):
    config, params = model
    flat = traverse_util.flatten_dict(params, sep="/")
    missing = {k: v for k, v in flat.items() if k != "encoder/layers_1/attention/value/kernel"}
    with pytest.raises(CheckpointFormatError,
                       match="encoder/layers_1/attention/value/kernel .* is missing"):
        t5x_checkpoint.check_params(traverse_util.unflatten_dict(missing, sep="/"), config)
    extra = dict(flat, **{"encoder/image_projection/kernel": np.zeros((3, 16), np.float32)})
    with pytest.raises(CheckpointFormatError, match="encoder/image_projection/kernel .*unknown"):
        t5x_checkpoint.check_params(traverse_util.unflatten_dict(extra, sep="/"), config)


def test_num_heads_errors(model):
    _, params = model
    with pytest.raises(CheckpointFormatError, match="16 = heads \\* head_dim .* num_heads=3"):
        t5x_checkpoint.config_from_t5x_params(params, num_heads=3)
    with pytest.raises(CheckpointFormatError, match="has 2 heads, not num_heads=4"):
        t5x_checkpoint.config_from_t5x_params(params, num_heads=4)


def test_convert_command_from_t5x(model, tmp_path, capsys, monkeypatch):
    from mmt_jax import main
    from mmt_jax.checkpoints import store
    config, params = model
    save_orbax(str(tmp_path / "runs" / "model_dir"), 5, params)
    out = str(tmp_path / "converted")
    monkeypatch.chdir(tmp_path)  # relative, as a README command gives it (orbax wants absolute)
    assert main.run(["convert", "--from-t5x", "runs/model_dir", "--to", out]) == 0
    assert "converted" in capsys.readouterr().out
    loaded_config, loaded = store.load_checkpoint(out)
    assert loaded_config.t5 == config
    assert_trees_equal(loaded, params)
    assert main.run(["convert", "--from-t5x", "nothing", "--to", out + "2"]) == 2
    assert "nothing: no such directory" in capsys.readouterr().err
