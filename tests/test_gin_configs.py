"""The model gin files parse and build exactly the published sizes; the catalog models build MMT4
and its text-only twin."""
import glob
import os
import re

import gin
import jax.numpy as jnp
import pytest

import mmt_jax
from mmt_jax.models.t5 import t5_config

GIN_FILES = sorted(path for path in glob.glob(os.path.join(mmt_jax.gin_search_path(), "models", "*.gin"))
                   if re.fullmatch(r"(t5|t5_1_1)_(tiny|small|base|large)\.gin", os.path.basename(path)))


def test_gin_files_are_installed():
    assert len(GIN_FILES) == 8


@pytest.mark.parametrize("path", GIN_FILES, ids=os.path.basename)
def test_model_gin_builds_its_size(path):
    name = os.path.basename(path)[:-4]
    variant, size = name.rsplit("_", 1)
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings(
            [os.path.join("models", os.path.basename(path))], ["t5.t5_config.dropout_rate = 0.1"])
        config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert config == t5_config(size, variant, dropout_rate=0.1)


@pytest.mark.parametrize("name, fusion", [("mmt4_tiny", True), ("t5_tiny_catalog", False)])
def test_catalog_model_gins_build_mmt4_and_its_text_only_twin(name, fusion):
    from mmt_jax.data import vocabulary
    from mmt_jax.models import config as config_lib
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        # runs/train.gin makes this binding for every model file
        gin.parse_config_files_and_bindings([f"models/{name}.gin"],
                                            ["config.ModelConfig.t5 = %MODEL_CONFIG"])
        model_config = gin.get_configurable(config_lib.ModelConfig)()
    finally:
        gin.clear_config()
    assert model_config.t5 == t5_config("tiny", vocab_size=896)
    assert model_config.t5.vocab_size >= vocabulary.vocabulary().vocab_size
    assert (model_config.fusion is not None) == fusion
    if fusion:
        assert model_config.fusion.representator == "patches" and model_config.fusion.patch_size == 8


@pytest.mark.parametrize("run, task, lengths, extra", [
    ("pretrain", "pretrain", {"inputs": 48, "targets": 48}, []),
    ("finetune", "attributes_removed100", {"inputs": 64, "targets": 8},
     ["INITIAL_CHECKPOINT_PATH = '/pretrained/checkpoint_300'"]),
])
def test_run_gins_set_their_task_and_lengths(run, task, lengths, extra):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings(
            [f"runs/{run}.gin", "models/mmt4_tiny.gin"],
            ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 10", *extra])
        assert gin.query_parameter("%TASK") == task
        assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == lengths
        image = gin.query_parameter("config.ModelConfig.image")  # stored with the checkpoints
        assert image.selector == gin.query_parameter("tasks.catalog_task.image").selector
        if run == "finetune":
            assert gin.query_parameter("train.train.infer_eval_examples") == 64
    finally:
        gin.clear_config()


def test_adafactor_gin_swaps_the_optimizer_and_keeps_the_schedule():
    """runs/adafactor.gin: one --gin_file selects Adafactor (a bare `--gin.train.train.optimizer=
    @optimizers.adafactor()` cannot: nothing has registered it), with train.gin's schedule."""
    import jax
    import optax
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings(
            ["runs/catalog.gin", "models/mmt4_tiny.gin", "runs/adafactor.gin"],
            ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 10", "TASK = 'match'", "LEARNING_RATE = 3e-3"])
        optimizer = gin.query_parameter("train.train.optimizer").scoped_configurable_fn()
        assert gin.query_parameter("optimizers.adafactor.learning_rate").selector == (
            "optimizers.linear_decay")  # train.gin's: peak LEARNING_RATE, WARMUP_STEPS
    finally:
        gin.clear_config()
    state = optimizer.init({"kernel": jnp.ones((256, 128))})  # optax factors dims >= 128
    factored = [s for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
        if isinstance(s, optax.FactoredState)]
    # Adafactor's factored second moments: a row and a column vector instead of a [256, 128] array.
    assert {factored[0].v_row["kernel"].shape, factored[0].v_col["kernel"].shape} == {(256,), (128,)}


def test_mixed_precision_is_a_gin_binding():
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings(["models/mmt4_tiny.gin"],
                                            ["t5.t5_config.dtype = 'bfloat16'"])
        config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert config.dtype == jnp.bfloat16  # activations; parameters stay float32 (test_layers.py)


def test_moe_gin_builds_odd_decoder_moe_layers_and_trains_experts_only():
    from mmt_jax.layers.moe import MoeConfig
    from mmt_jax.models.t5 import moe_layers
    gin.clear_config()
    try:
        gin.add_config_file_search_path(mmt_jax.gin_search_path())
        gin.parse_config_files_and_bindings(
            ["runs/finetune.gin", "models/moe_tiny_catalog.gin"],
            ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 10", "INITIAL_CHECKPOINT_PATH = '/x'",
             "train.train.optimizer = @optimizers.train_only()",
             "optimizers.train_only.mode = 'experts'"])
        config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
        # builds (train_only.tx is bound by the model file) and refuses a model without MoE layers
        optimizer = gin.query_parameter("train.train.optimizer").scoped_configurable_fn()
    finally:
        gin.clear_config()
    assert config.moe == MoeConfig(num_experts=8, num_selected=2, aux_loss_weight=0.1)
    assert moe_layers(config.decoder_moe_layers, config.num_decoder_layers) == {1}
    assert config.has_moe
    with pytest.raises(ValueError, match="needs MoE layers"):
        optimizer.init({"encoder": {"layers_0": {"mlp": {"wo": {"kernel": jnp.zeros((2, 2))}}}}})


def test_a_runs_folder_on_sys_path_does_not_break_gin(tmp_path, monkeypatch):
    """A script or notebook beside the user's own runs/ folder (README: model dirs under runs/) has
    that folder on sys.path as a namespace package; gin must still find runs/*.gin in the package
    (gin 0.5 alone fails with a TypeError), and the folder must import as before afterwards."""
    import importlib.util
    import sys
    from mmt_jax import gin_config

    (tmp_path / "runs" / "mmt4").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("runs").origin is None  # the trap: a namespace package

    @gin.configurable("probe_for_test")
    def probe(task_feature_lengths=gin.REQUIRED):
        return task_feature_lengths

    try:
        lengths = gin_config.run_configured(
            probe, ["runs/catalog.gin", "models/mmt4_tiny.gin"],
            ["MODEL_DIR = 'runs/mmt4'", "TRAIN_STEPS = 1", "TASK = 'match'",
             "probe_for_test.task_feature_lengths = %TASK_FEATURE_LENGTHS"])
    finally:
        gin.clear_config()
    assert lengths == {"inputs": 64, "targets": 16}
    assert "runs" not in sys.modules or sys.modules["runs"] is not None
    assert importlib.util.find_spec("runs").origin is None  # unmasked again


def test_includes_resolve_as_package_resources_whatever_the_working_directory(tmp_path, monkeypatch):
    """Every include in our gin files names the package (`mmt_jax/gin/<folder>/<file>.gin`), which
    gin reads as a package resource: from a directory holding the user's own runs/, models/ and t5x/
    folders (namespace packages on sys.path, which break gin 0.5's bare `runs/x.gin` lookups) and
    with no search path at all, as t5x's binaries parse them."""
    from gin import resource_reader

    for name in ("runs", "models", "t5x"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = mmt_jax.gin_search_path()
    includes = [re.fullmatch(r"include '([^']+)'\s*", line).group(1)
                for path in glob.glob(os.path.join(root, "*", "*.gin"))
                for line in open(path) if line.startswith("include")]
    ours = [path for path in includes if not path.startswith("t5x/configs/")]
    assert len(ours) >= 15
    for path in ours:
        assert path.startswith("mmt_jax/gin/") and resource_reader.system_path_file_exists(path), path
    gin.clear_config()
    try:
        # runs/finetune.gin includes catalog.gin, which includes train.gin and catalog_tasks.gin
        gin.parse_config_files_and_bindings(
            ["mmt_jax/gin/runs/finetune.gin", "mmt_jax/gin/models/mmt4_tiny.gin"], [],
            finalize_config=False)
        assert gin.query_parameter("%TASK") == "attributes_removed100"
        assert gin.query_parameter("%LEARNING_RATE") > 0  # from train.gin
    finally:
        gin.clear_config()
