"""Gin wiring in one place: parse a run's gin files and bindings, then call what they configure.

The train and eval binaries (`main.py`) and the main job (`demo.py`) all run through
`run_configured`, so a command line and a program configure a run the same way:

    run_configured(train.train, ["runs/catalog.gin", "models/mmt4_tiny.gin"],
                   ['MODEL_DIR="runs/mmt4"', "TRAIN_STEPS=300"])

Gin files are searched in the package's `gin/` (`mmt_jax.gin_search_path()`), then in
`search_paths`.
"""
import logging
from typing import Callable, Sequence

import gin

from mmt_jax import gin_search_path
from mmt_jax.errors import GinError


def _not_path_noise(record: logging.LogRecord) -> bool:
    # gin logs an error for each search path a file is not in before it finds it.
    return not record.getMessage().startswith("Path not found")


def run_configured(configurable: Callable, gin_files: Sequence[str], bindings: Sequence[str],
                   search_paths: Sequence[str] = ()):
    """Parses `gin_files` and `bindings` ("NAME=VALUE"), then returns `configurable()` as they
    configure it; a file or binding that does not parse or names nothing is a `GinError`. The
    configuration is cleared afterwards, so a later run in the same process starts from its own."""
    root = logging.getLogger()
    if _not_path_noise not in root.filters:
        root.addFilter(_not_path_noise)
    gin.clear_config()
    for path in [gin_search_path(), *search_paths]:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
        run = gin.get_configurable(configurable)
    except (ValueError, KeyError, ImportError, OSError, NameError, SyntaxError) as e:
        raise GinError(f"gin: {e}") from None
    try:
        return run()
    finally:
        gin.clear_config()
