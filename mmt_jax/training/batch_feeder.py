"""Batches read on a background thread, so the training loop waits on a queue, not inside tf.data.

A tf.data iterator's `next` blocks in C++ until an element is ready; Python runs signal handlers only
between bytecodes of the main thread, so a SIGTERM that arrives while the pipeline warms up (a
shuffle buffer filling, a resumed run skipping the batches it had read) was not seen until the first
batch came, if ever. `BatchFeeder.next` waits in short slices and asks the caller whether to stop.
"""
import queue
import threading
from typing import Callable, Iterator

_POLL_SECONDS = 0.1


class BatchFeeder:
    """Reads `iterator` on a daemon thread, up to `depth` batches ahead; use with `closing()`."""

    def __init__(self, iterator: Iterator, depth: int = 2):
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="batch-feeder", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for batch in self._iterator:
                if not self._put((batch, None)):
                    return
            self._put((None, StopIteration()))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as it is
            self._put((None, error))

    def next(self, should_stop: Callable[[], bool]):
        """The next batch; None as soon as `should_stop()` while waiting for it. An error of the
        input pipeline (a bad record, the end of the data) is raised here, as it was raised there."""
        while True:
            try:
                batch, error = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if should_stop():
                    return None
                continue
            if error is not None:
                raise error
            return batch

    def close(self) -> None:
        """Stops reading ahead; the thread ends at its next batch (it never blocks the process's exit)."""
        self._closed.set()
