"""One writer per model directory: an advisory `flock` on `MODEL_DIR/.lock`.

The operating system drops the lock when its holder exits in any way (return, exception, SIGKILL),
so a crashed run never leaves a stale lock; the pid and host written into the file only make the
refusal say who holds it. In a multi-process run only process 0 takes it (every process writes the
same checkpoints).
"""
import fcntl
import os
import socket

from mmt_jax.errors import ModelDirInUseError

LOCK_FILE = ".lock"


class ModelDirLock:
    """Held from construction until `release()`; raises `ModelDirInUseError` if another holds it."""

    def __init__(self, model_dir: str):
        os.makedirs(model_dir, exist_ok=True)
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 256, 0).decode("utf-8", "replace").strip() or "another run"
            os.close(self._fd)
            self._fd = None
            raise ModelDirInUseError(f"{model_dir} is being written by {holder}; wait for it to "
                                     "finish or stop it (one run per MODEL_DIR)") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
