"""Gin wiring in one place: parse a run's gin files and bindings, then call what they configure.

The train and eval binaries (`main.py`) and the main job (`demo.py`) all run through
`run_configured`, so a command line and a program configure a run the same way:

    run_configured(train.train, ["runs/catalog.gin", "models/mmt4_tiny.gin"],
                   ['MODEL_DIR="runs/mmt4"', "TRAIN_STEPS=300"])

Gin files are searched in the package's `gin/` (`mmt_jax.gin_search_path()`), then in
`search_paths`.
"""
import contextlib
import importlib.util
import logging
import os
import re
import sys
from typing import Callable, Sequence

import gin

from mmt_jax import gin_search_path
from mmt_jax.errors import GinError


def _not_path_noise(record: logging.LogRecord) -> bool:
    # gin logs an error for each search path a file is not in before it finds it.
    return not record.getMessage().startswith("Path not found")


@contextlib.contextmanager
def _namespace_folders_masked(names: Sequence[str]):
    """While gin parses: the names of the package's gin folders (`runs`, `models`, `t5x`) do not
    import as namespace packages.

    gin reads `runs/train.gin` first as the resource `train.gin` of a Python package `runs`; a
    user's own `runs/` folder on sys.path (beside a script, or a notebook's directory) imports as a
    namespace package with no file, and gin 0.5 then fails with a TypeError instead of going on to
    its search path. Marking such a name as not importable (`sys.modules[name] = None`) makes gin
    skip it; a real package of that name (with a file) is left alone.
    """
    masked = []
    for name in names:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin is None:
            sys.modules[name] = None
            masked.append(name)
    try:
        yield
    finally:
        for name in masked:
            del sys.modules[name]


def _gin_folders() -> list[str]:
    root = gin_search_path()
    return [name for name in os.listdir(root)
            if name.isidentifier() and os.path.isdir(os.path.join(root, name))]


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
        with _namespace_folders_masked(_gin_folders()):
            gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
        run = gin.get_configurable(configurable)
    except (ValueError, KeyError, ImportError, OSError, NameError, SyntaxError) as e:
        raise GinError(f"gin: {e}") from None
    try:
        return run()
    finally:
        gin.clear_config()


_SETTING = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(?:#\s*(.*))?$")
_INCLUDE = re.compile(r"^include\s+'mmt_jax/gin/(.+)'\s*$")


def settings(gin_file: str) -> list[tuple[str, str, str]]:
    """The settings (gin macros) a package run file and the files it includes define, as
    (name, default, comment) in the order a run reads them, a later definition replacing an
    earlier one; for `--help`. Defaults are gin's text (`%gin.REQUIRED`: none, must be bound)."""
    found: dict[str, tuple[str, str]] = {}

    def read(relative: str) -> None:
        with open(os.path.join(gin_search_path(), relative), encoding="utf-8") as f:
            for line in f:
                if include := _INCLUDE.match(line):
                    read(include.group(1))
                elif setting := _SETTING.match(line):
                    name, value, comment = setting.groups()
                    found.pop(name, None)
                    found[name] = (value, comment or "")

    read(gin_file)
    return [(name, value, comment) for name, (value, comment) in found.items()]
