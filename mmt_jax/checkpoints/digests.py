"""Content digests of a checkpoint's files: a truncated or bit-flipped checkpoint is named, not loaded.

A sealed checkpoint directory holds `digests.json`, the size and SHA-256 of every other file in it:

    {"algorithm": "sha256", "files": {"params/d/3f0c...": {"size": 1234, "sha256": "9a1b..."}, ...}}

`seal` writes it (atomically: a temporary file renamed into place); `verify` re-reads every listed file
and raises `CorruptCheckpointError` naming the checkpoint and the first file that is missing, has
another size or other contents. Files that appear after sealing are not checked, and neither is
orbax's step metadata (`_CHECKPOINT_METADATA`, which orbax rewrites with the commit time after the
rename; nothing we restore reads it).

Digests are of files, not arrays, so they cover every item (parameters, optimizer state, model
config, progress), need no device transfer, and work for checkpoints written by many processes.
"""
import contextlib
import hashlib
import json
import os

from mmt_jax.errors import CorruptCheckpointError

MANIFEST = "digests.json"
_UNSEALED = (MANIFEST, "_CHECKPOINT_METADATA")  # top-level files left out of the manifest
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """The regular files under `directory` that are sealed, as sorted '/'-joined relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if relative not in _UNSEALED:
                found.append(relative)
    return sorted(found)


def seal(directory: str) -> None:
    """Writes `directory/digests.json` for the files `directory` holds now."""
    files = {}
    for relative in _files(directory):
        path = os.path.join(directory, relative)
        files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    temporary = os.path.join(directory, f".{MANIFEST}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(directory, MANIFEST))


def is_sealed(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def verify(directory: str) -> bool:
    """True when `directory` is sealed and every listed file is whole; False when it has no
    manifest (written before digests existed); raises `CorruptCheckpointError` otherwise."""
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        return False
    try:
        with open(manifest_path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        entries = [(str(name), int(entry["size"]), str(entry["sha256"]))
                   for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(directory, MANIFEST, f"unreadable manifest ({e})") from None
    for name, size, sha256 in entries:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(directory, name, "missing")
        actual = os.path.getsize(path)
        if actual != size:
            raise CorruptCheckpointError(directory, name, f"{actual} bytes, {size} were written")
        if _sha256(path) != sha256:
            raise CorruptCheckpointError(directory, name, "contents differ from what was written")
    return True


@contextlib.contextmanager
def reading(directory: str, verified: bool):
    """Around orbax's read of `directory` (`verified`: what `verify` returned). A failure of a
    checkpoint without digests becomes one `CorruptCheckpointError` (corrupt, most likely, though no
    file can be named) instead of orbax's or tensorstore's traceback; a verified checkpoint's
    failure is not corruption and passes through as it is."""
    try:
        yield
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files
        if verified:
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CorruptCheckpointError(directory, "(no digests to name the file)",
                                     f"unreadable: {reason}") from None
