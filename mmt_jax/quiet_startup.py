"""What the command line does not show: native libraries' start-up notices that are not the user's
business.

TensorFlow (only the input pipeline's, on the CPU) writes, before its logging is set up and whatever
`TF_CPP_MIN_LOG_LEVEL` says, a oneDNN notice and "Could not find cuda drivers"; on a machine without
CUDA it then logs "failed call to cuInit" as an error when it lists devices. `import_tensorflow`
imports it with the process's stderr closed for that moment, and hides the GPUs from it: the
accelerator is JAX's, and TensorFlow allocating on it would take JAX's memory. A Python exception
(a broken install) still reaches the user. tensorflow-datasets' per-build notices and, off a terminal,
its progress bars go too.
"""
import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def _native_stderr_closed():
    """Native writes to file descriptor 2 go to /dev/null inside the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _not_builder_notice(record: logging.LogRecord) -> bool:
    # tensorflow-datasets warns at every catalog it opens that its config is not a registered one:
    # each catalog is its own config by design (data/tfds_catalog.py).
    return not record.getMessage().startswith("Using custom data configuration")


def import_tensorflow() -> None:
    """Imports TensorFlow, tensorflow-text and tensorflow-datasets quietly, hides the GPUs from
    TensorFlow, and quiets tensorflow-datasets' notices. Where TensorFlow has already run (a second
    command in one process), its devices are left as they are."""
    with _native_stderr_closed():
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (seqio's; it loads native ops of its own)
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow has run already: its devices are fixed
            pass
    import tensorflow_datasets as tfds
    logging.getLogger("absl").addFilter(_not_builder_notice)
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
