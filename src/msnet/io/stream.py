"""A study read in a background thread while its slices are consumed as they are decoded.

:class:`StudyStream` runs a read (any callable that reads one study, e.g. ``read_study`` behind a
``.zip`` extraction and the checks) under :func:`msnet.io.decode.streamed`. When the read decodes a
series, :meth:`StudyStream.started` returns the :class:`~msnet.io.decode.SeriesProgress` of its
array, and :meth:`StudyStream.batches` yields its slices in canonical order as soon as they are
decoded; the read then finishes as it would have alone (failed files dropped, volume checks) and
:meth:`StudyStream.result` returns what it returned, or raises its error.

The rows consumed are those of the volume the read returns only if :meth:`StudyStream.rows_match`
says so: a file that failed to decode (its slice dropped) or a decode run again after a worker
crash gives the volume other rows, and the consumer must start again from that volume.

e.g. with StudyStream(lambda: read_study(folder)) as st:
...      for start, stop in st.batches(16):
...          work(st.progress.hu[start:stop])
...      vol = st.result()
...      usable = st.rows_match(vol.hu)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

from msnet.io.decode import SeriesProgress, streamed

T = TypeVar("T")


class StudyStream(Generic[T]):
    def __init__(self, read: Callable[[], T]) -> None:
        self.progress: SeriesProgress | None = None
        self._started = threading.Event()
        self._future: Future = Future()

        def run() -> None:
            def consume(progress: SeriesProgress) -> None:
                self.progress = progress
                self._started.set()

            try:
                with streamed(consume):
                    value = read()
            except BaseException as exc:  # handed to the consumer by result()
                self._future.set_exception(exc)
            else:
                self._future.set_result(value)
            finally:
                self._started.set()

        self._thread = threading.Thread(target=run, name="msnet-read", daemon=True)
        self._thread.start()

    def __enter__(self) -> "StudyStream[T]":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            return  # KeyboardInterrupt, SystemExit: the process is stopping; the read is a daemon thread
        self.close()

    def close(self) -> None:
        """Wait for the read to end (it is never abandoned half way: its files and workers are released)."""
        self._thread.join()

    def started(self) -> SeriesProgress | None:
        """The decode's progress once it has started, or None if the read ended without a streamed decode
        (NIfTI, images, a failed read)."""
        self._started.wait()
        return self.progress

    def failed(self) -> bool:
        return self._future.done() and self._future.exception() is not None

    def result(self) -> T:
        """What the read returned (waits for it); its error if it failed."""
        return self._future.result()

    def batches(self, size: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of decoded slices of :attr:`progress` ``.hu``, in canonical order, as they come."""
        progress = self.started()
        if progress is not None:
            yield from progress.batches(size)

    def rows_match(self, hu: np.ndarray) -> bool:
        """Whether ``hu`` (the volume the read returned) is the array the stream filled, every row kept."""
        p = self.progress
        return (p is not None and p.finished and p.ready == p.n_slices and hu.shape == p.hu.shape
                and np.shares_memory(hu, p.hu))
