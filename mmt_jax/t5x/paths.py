"""Paths given to t5x's binaries, made absolute: t5x's checkpointer (orbax) refuses a relative
`MODEL_DIR` at its first save, so the run files (`mmt_jax/gin/t5x/*.gin`) pass every directory and
checkpoint path through `absolute`, and a README command with `runs/...` works from any directory."""
import os


def absolute(path: str | None) -> str | None:
    """`path` relative to the working directory, made absolute (`~` expanded); a URL (`gs://...`)
    and None are returned as they are."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))
