"""A one-shot background computation: the next batch, prepared while the current step runs.

Why a thread and not a process: the loader's heavy parts release the GIL (``tokenizers``'
``encode_batch`` runs in Rust, parquet reads in Arrow, shard reads are page faults), and a thread
shares the loader's position with no copy, so the loader can hand out a prepared batch and keep
its saved state exactly at the batches handed out (``mixture.TrainLoader``). A daemon thread:
an unused prefetch never holds up the interpreter's exit.
"""

from __future__ import annotations

import threading


class Job:
    """Run ``fn()`` in a daemon thread; ``result()`` waits and returns it (or raises its error)."""

    def __init__(self, fn):
        self._done = threading.Event()
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name="poelm-prefetch")
        self._thread.start()

    def _run(self, fn):
        try:
            self._value = fn()
        except BaseException as e:  # handed to the caller of result(), which raises it
            self._error = e
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
