"""The model gin files parse and build exactly the published sizes."""
import glob
import os

import gin
import pytest

import mmt_jax
from mmt_jax.models.t5 import t5_config

GIN_FILES = sorted(glob.glob(os.path.join(mmt_jax.gin_search_path(), "models", "*.gin")))


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
