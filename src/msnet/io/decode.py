"""Pixel data to HU: imagecodecs / GDCM / pylibjpeg decoders and a pool of worker processes writing into shared memory.

Public API: :func:`decode_file` (one file), :func:`decode_series` (a series into one array),
:func:`to_hu`, :func:`quiet_pydicom`, :func:`shutdown_pool`, :func:`stop_workers`,
:func:`stored_bytes_problem`, :class:`DecodeTask`, :func:`streamed` and :class:`SeriesProgress` (a
consumer that starts on the first decoded slices while the rest are decoded).

Streamed decode: the files of a series are decoded in canonical slice order (sorted by their first
slot, which the header pass fixed), in chunks. Under :func:`streamed`, :func:`decode_series` hands
the consumer a :class:`SeriesProgress` as soon as the series array exists; it tells how many leading
slices are decoded and waits for more (:meth:`SeriesProgress.wait`,
:meth:`SeriesProgress.batches`). The reader goes on as without it: failures, checks and the final
volume are the same.

What is read when (pydicom parses each file once):

1. Header pass, in the calling process (:func:`msnet.io.dicom.read_header`, which calls
   :func:`msnet.io.pixeldata.parse_header`): pydicom parses the file up to its pixel data
   (``stop_before_pixels``; elements longer than ``DEFER_BYTES`` are skipped, not read). The
   position of the pixel data element, its tag, VR and length, the file's encoding and the pixel
   keywords (Rows, Columns, BitsAllocated, ... and the transfer syntax) make a
   :class:`~msnet.io.pixeldata.PixelInfo`, kept with the header and sent in the :class:`DecodeTask`.
2. Size check (:func:`stored_bytes_problem`), before the series array is allocated: the file's
   size against the pixels the header declares. Nothing is read.
3. Decode (:func:`decode_file`, in a worker process for a compressed series): the file is opened,
   and the pixel data element alone is read from the recorded position (a defined length: that
   many bytes, never more than the file holds; encapsulated data: to the end of the file). Every
   check runs on these bytes: a declared length past the end of the file, encapsulated items cut
   short or broken, missing frames, a frame without its end-of-image marker or with a broken JPEG
   marker structure. pydicom's pixel API then decodes a minimal data set made of the recorded
   keywords and that one element, trying the decoders of ``DECODERS`` in turn (``SAFE_DECODERS``
   after a worker crash). The header is not parsed again.
4. Direct path (single-frame unsigned 16-bit JPEG Lossless, :func:`gdcm_direct_ok`; the common CT
   case): the bytes read in step 3 must tile the file exactly (basic offset table, one JPEG frame,
   sequence delimiter at the end of the file) and hold a sound frame; then the frame is decoded by
   the fastest installed decoder of :data:`msnet.io.jpeg.LOSSLESS_DECODERS` (imagecodecs'
   libjpeg-turbo 3, its LJPEG codec, GDCM reading the file by name with ``ImageRegionReader``),
   the next one on failure, and pydicom's pixel API as above after them (:mod:`msnet.io.jpeg`).

A file whose header pass found no pixel data element is searched for the tag's bytes (no parse),
only to word its error. After a worker crash the series is decoded again in this process: the
pixel data elements are read again, the headers are not parsed again.

A decode that comes back short is refused, never filled in: JPEG and JPEG 2000 frames must end
with their end-of-image marker (GDCM's direct path reports no error for a truncated stream and
pylibjpeg fills the missing rows), and a file too small for the pixels its header declares
(uncompressed, or JPEG Lossless at one bit per sample) is refused before any buffer is allocated.

Worker processes reset SIGTERM to its default (a forked worker would otherwise inherit the
parent's handler, e.g. uvicorn's, and ignore it), leave SIGINT to the parent, and exit when the
parent is gone; :func:`stop_workers` (safe in a signal handler) stops them at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from msnet.io.jpeg import (_GDCM_DIRECT_SYNTAXES, _frames_problem, _gdcm_direct, gdcm_direct_ok,  # noqa: F401
                           jpeg_problem, lossless_direct)
from msnet.io.pixeldata import (PixelInfo, has_pixel_tag, parse_header, pixel_dataset, pixel_info, pixel_value,
                                read_pixel_bytes)
from msnet.io.volume import AIR_HU, floor_out_of_field

logger = logging.getLogger(__name__)

DECODERS = ("gdcm", "pylibjpeg", "")  # "" lets pydicom try every plugin it has
# without GDCM: for a file decoded again in this process after a worker died on it (GDCM aborts the
# whole process on some broken JPEG streams, where pylibjpeg raises an error)
SAFE_DECODERS = ("pylibjpeg", "pydicom", "pillow", "pyjpegls")


_QUIET_LOGGERS = ("pydicom", "nibabel.global")  # nibabel's has its own stderr handler


@contextlib.contextmanager
def quiet_pydicom():
    """No reader chatter while reading: pydicom's warnings and log lines (invalid values such as
    GUID-style UIDs, errors about a broken header), nibabel's header fixes, Pillow's EXIF warnings.
    What matters is reported in the study's warnings or its error."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    was_disabled = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            for module in (r"pydicom\.", r"PIL\.", r"nibabel\."):
                warnings.filterwarnings("ignore", module=module)
            yield
    finally:
        config.settings.reading_validation_mode = old
        for lg, disabled in zip(loggers, was_disabled):
            lg.disabled = disabled


def to_hu(stored: np.ndarray, slope: float, intercept: float, padding=None, padding_limit=None,
          out: np.ndarray | None = None) -> np.ndarray:
    """Stored values to HU (float32), padding and out-of-field pixels set to air.

    >>> to_hu(np.array([[0, 1024, 63536]], np.uint16), 1.0, -1024.0, padding=63536).tolist()
    [[-1024.0, 0.0, -1000.0]]
    """
    if out is None:
        out = np.empty(stored.shape, np.float32)
    if slope != 1:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
        np.add(out, np.float32(intercept), out=out)
    else:
        np.add(stored, np.float32(intercept), out=out, casting="unsafe")
    if padding is not None:
        pad = [_as_stored(padding, stored.dtype)]
        if padding_limit is not None:
            pad.append(_as_stored(padding_limit, stored.dtype))
        out[(stored >= min(pad)) & (stored <= max(pad))] = AIR_HU
    return floor_out_of_field(out)


def _as_stored(value, dtype) -> int:
    """PixelPaddingValue in the pixels' signedness (it is often written with the other VR)."""
    v, info = int(value), np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is None:
        return v
    bits = info.bits
    if v > info.max:
        v -= 1 << bits
    elif v < info.min:
        v += 1 << bits
    return v


_DEFLATED = "1.2.840.10008.1.2.1.99"  # the whole data set is zlib-compressed: its size says nothing


def stored_bytes_problem(path: str, ds, rows: int, cols: int, frames: int) -> str | None:
    """Why a file cannot hold the pixels its header declares, from its size alone (None if it can).

    Uncompressed: the file must hold Rows x Columns x frames x samples x BitsAllocated/8 bytes.
    JPEG Lossless codes each sample with at least one bit, so it needs an eighth of the samples
    in bytes. Checked before the volume is allocated, so a small file that claims 60000 x 60000
    pixels costs nothing. (Other codecs are bounded by the slice and voxel limits.)
    """
    from pydicom.uid import UncompressedTransferSyntaxes

    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    samples = int(ds.get("SamplesPerPixel") or 1) * rows * cols * frames
    size = os.path.getsize(path)
    if (ts in UncompressedTransferSyntaxes and ts != _DEFLATED) or not ts:
        need = samples * max(int(ds.get("BitsAllocated") or 16), 1) // 8
        if size >= need:
            return None
        info = pixel_info(ds)
        if (info is None or info.tag is None) and not has_pixel_tag(path):
            return "no pixel data"
        return f"truncated: the header declares {need} bytes of pixels, the file holds {size} bytes"
    if ts in _GDCM_DIRECT_SYNTAXES and size < samples // 8:
        return (f"the header declares {rows} x {cols} pixels x {frames} frames but the file holds only "
                f"{size} bytes of JPEG Lossless data (at least {samples // 8} needed)")
    return None


def decode_file(path: str, direct: tuple[int, int] | None = None, safe: bool = False,
                pixel: PixelInfo | None = None) -> tuple[np.ndarray | None, str, str | None]:
    """Stored pixel values of one file: (array or None, decoder used, error text).

    ``pixel``: where the header pass found the pixel data (without it, this makes the header pass
    itself). The pixel data element is read once, from there; the header is not parsed again.
    ``direct=(rows, cols)``: try the direct JPEG Lossless decoders first (for files where ``gdcm_direct_ok``:
    :func:`msnet.io.jpeg.lossless_direct`). Then GDCM, pylibjpeg and any pydicom decoder through pydicom's
    pixel API. ``safe``: no direct path and never GDCM.
    """
    if pixel is None:
        found = parse_header(path)
        if found is None:
            return None, "", "unreadable: not a DICOM file, or its header cannot be parsed"
        pixel = found[1]
    if pixel.tag is None:
        return None, "", ("no pixel data where the header ends (the file is cut short or its header damaged)"
                          if has_pixel_tag(path) else "no pixel data")
    try:
        data = read_pixel_bytes(path, pixel)
    except (OSError, ValueError) as exc:
        return None, "", f"unreadable ({type(exc).__name__}: {exc})"
    if direct is not None and not safe:
        try:
            arr, decoder = lossless_direct(path, data, pixel, *direct)
            return arr, decoder, None
        except Exception as exc:  # fall back to pydicom below
            logger.debug("%s: direct JPEG Lossless decode failed (%s)", path, exc)
    value, problem = pixel_value(data, pixel)
    if problem is None:
        problem = _frames_problem(value, pixel)
    if problem:
        return None, "", problem
    return _decode_value(pixel, value, safe)


def _decode_value(pixel: PixelInfo, value: bytes, safe: bool) -> tuple[np.ndarray | None, str, str | None]:
    """Decode one pixel data element with pydicom's pixel API, trying the decoders in order."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import UncompressedTransferSyntaxes

    try:
        ds = pixel_dataset(pixel, value)
    except Exception as exc:  # a recorded keyword pydicom refuses (e.g. a non-numeric Rows)
        return None, "", f"unreadable ({type(exc).__name__}: {exc})"
    ts = pixel.transfer_syntax
    plugins = ("native",) if ts in UncompressedTransferSyntaxes else SAFE_DECODERS if safe else DECODERS
    err = ""
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pixel_array(ds, decoding_plugin="" if plugin == "native" else plugin)
            return arr, plugin or "pydicom", None
        except Exception as exc:
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None, "", err or "cannot decode"


class DecodeTask(NamedTuple):
    """One file to decode: its frames go to slots of the series array, as HU.

    ``frames``: (frame index or None, slot, slope, intercept, padding value, padding limit) each.
    ``direct``: GDCM may read the file itself. ``pixel``: where the header pass found the pixel
    data (None: the decode makes the header pass itself).
    """

    path: str
    frames: list
    shape: tuple[int, int]
    direct: bool
    pixel: PixelInfo | None = None


def _as_task(task: tuple) -> DecodeTask:
    return task if isinstance(task, DecodeTask) else DecodeTask(*task)


def _decode_into(tasks: list, out: np.ndarray, safe: bool = False,
                 done=None) -> list[tuple[str, str | None]]:
    """Decode each task's file and write its frames, as HU, to their slots of ``out``; ``done(i)``
    is called after task ``i``."""
    results = []
    for i, (path, frames, (rows, cols), direct, pixel) in enumerate(map(_as_task, tasks)):
        arr, plugin, err = decode_file(path, (rows, cols) if direct else None, safe=safe, pixel=pixel)
        if arr is not None and arr.shape[-2:] != (rows, cols):
            arr, err = None, f"decoded size {arr.shape[-2:]} differs from Rows x Columns {rows}x{cols}"
        if arr is not None:
            n = arr.shape[0] if arr.ndim == 3 else 1
            for k, slot, slope, intercept, pad, lim in frames:
                if k is not None and k >= n:
                    err = f"frame {k} missing (file has {n})"
                    break
                to_hu(arr if k is None else arr[k], slope, intercept, pad, lim, out=out[slot])
        results.append((plugin, err))
        if done is not None:
            done(i)
    return results


def _decode_chunk_mapped(tasks: list, filename: str, shape: tuple) -> list:
    out = np.memmap(filename, np.float32, mode="r+", shape=shape)
    try:
        with quiet_pydicom():
            return _decode_into(tasks, out)
    finally:
        out.flush()
        del out


_POOL: ProcessPoolExecutor | None = None
IN_WORKER = False
"""True in a process that reads whole studies for a parent (:func:`worker_init`): it decodes itself,
with no pool of its own."""
MAX_WORKERS = 16
"""Decode processes at most (one per core up to this): a 16-core GPU host decodes a 150-slice JPEG Lossless
study in about the time its GPU needs for the model."""
_PARENT_POLL_S = 0.5


_HELD = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def _signals_held():
    """SIGTERM and SIGINT held back while worker processes are forked, delivered right after: an
    exception raised by a handler inside fork's callbacks would be swallowed ("Exception ignored")."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_init(parent: int) -> None:
    """In each worker: default SIGTERM, SIGINT left to the parent, exit once the parent is gone, and
    no decoder chatter on stderr."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the mask is inherited from the forking thread
    with contextlib.suppress(OSError):  # the C decoders print to fd 2 ("Corrupt JPEG data ..."); each
        devnull = os.open(os.devnull, os.O_WRONLY)  # file's error comes back as text instead
        os.dup2(devnull, 2)
        os.close(devnull)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="msnet-parent-watch", daemon=True).start()


def worker_init(parent: int) -> None:
    """Initializer for a pool of study readers (processes that read whole studies, each decoding
    its own files): the decode workers' signal handling and parent watch, and no nested pool."""
    global IN_WORKER, _POOL
    IN_WORKER, _POOL = True, None  # a forked copy of the parent's pool must never be used here
    _worker_init(parent)


def _n_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        # fork: workers need no re-import of the caller's __main__ (spawn/forkserver would re-run
        # unguarded scripts); they only run pydicom/GDCM code.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _POOL = ProcessPoolExecutor(_n_workers(), mp_context=multiprocessing.get_context(method),
                                    initializer=_worker_init, initargs=(os.getpid(),))
        atexit.register(shutdown_pool)
    return _POOL


def stop_workers() -> None:
    """Terminate the decode workers at once. Takes no lock, so a signal handler may call it (the
    interrupted code may hold the pool's locks); the pool, now broken, is dropped at exit."""
    pool = _POOL
    if pool is None:
        return
    try:
        procs = list((getattr(pool, "_processes", None) or {}).values())
    except RuntimeError:  # the pool's manager thread changed the dict meanwhile
        procs = []
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()


def shutdown_pool(kill: bool = False, wait_s: float = 0.0) -> None:
    """Stop the decode workers: after their current files, or at once with ``kill``. ``wait_s``:
    wait that long for the pool's manager thread (after a kill, so that the interpreter's exit
    does not race it on a closed pipe)."""
    global _POOL
    if kill:
        stop_workers()
    pool, _POOL = _POOL, None
    if pool is None:
        return
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    if wait_s > 0 and manager is not None:
        manager.join(wait_s)


def _chunks(items: list, n: int) -> list[list]:
    """``items`` in at most ``n`` contiguous chunks of near-equal size, in order."""
    n = min(len(items), n)
    return [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]


def map_chunks(fn, items: list, min_items: int = 64) -> list:
    """``fn`` (a module-level function: list -> list) over contiguous chunks of ``items`` in the worker
    processes, results concatenated in order; in this process when there are fewer than ``min_items``
    items or fewer than 4 cores (measured on 2 cores: sending 148 parsed headers back costs more than
    parsing them on the second core saves; on 16 cores the header pass of P001 drops to 0.05 s). A
    pool that breaks falls back to this process too."""
    if len(items) < min_items or _n_workers() < 4 or IN_WORKER:
        return fn(items)
    chunks = _chunks(items, 2 * _n_workers())
    try:
        with _signals_held():
            futures = [_pool().submit(fn, c) for c in chunks]
        return [r for f in futures for r in f.result()]
    except (BrokenProcessPool, OSError, RuntimeError) as exc:
        logger.warning("worker processes failed (%s); working in this process", exc)
        shutdown_pool()
        return fn(items)


class SeriesProgress:
    """A series array being filled by a decode that goes on: how many leading slices (in canonical
    order) are decoded, and a wait for more. Chunks of files are decoded in the order of their first
    slot, so the decoded part grows from the first slice on.

    ``hu``: the array the decode writes into. ``n_slices``: its length. Rows at or beyond
    :attr:`ready` must not be read. Once :attr:`finished`, :attr:`ready` is final: ``n_slices`` when
    every chunk came back, fewer when the decode broke off (the reader then decodes again or fails,
    and the consumer must use the volume the reader returns).
    """

    def __init__(self, hu: np.ndarray, first_slots: list[int]) -> None:
        self.hu = hu
        self.n_slices = int(hu.shape[0])
        self._first = list(first_slots)  # per chunk, ascending
        self._done = [False] * len(self._first)
        self._next = 0
        self._ready = 0 if self._first else self.n_slices
        self._finished = False
        self._cond = threading.Condition()

    @property
    def ready(self) -> int:
        return self._ready

    @property
    def finished(self) -> bool:
        return self._finished

    def chunk_done(self, k: int) -> None:
        with self._cond:
            self._done[k] = True
            while self._next < len(self._first) and self._done[self._next]:
                self._next += 1
            # every slot before the first slot of the first chunk not yet done is decoded
            self._ready = self._first[self._next] if self._next < len(self._first) else self.n_slices
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def wait(self, upto: int, timeout: float | None = None) -> int:
        """Block until slices ``[0, upto)`` are decoded or the decode has finished; returns :attr:`ready`."""
        upto = min(int(upto), self.n_slices)
        with self._cond:
            self._cond.wait_for(lambda: self._ready >= upto or self._finished, timeout)
            return self._ready

    def batches(self, size: int):
        """``(start, stop)`` of consecutive decoded slices, at most ``size`` each, in canonical order,
        each as soon as it is decoded. Stops early if the decode broke off (see :attr:`finished`)."""
        start = 0
        while start < self.n_slices:
            stop = min(start + size, self.n_slices)
            if self.wait(stop) < stop:
                return
            yield start, stop
            start = stop


_STREAM = threading.local()


@contextlib.contextmanager
def streamed(consumer):
    """Within this block, in this thread, the next :func:`decode_series` hands ``consumer`` its
    :class:`SeriesProgress` (once, before decoding starts), then decodes as usual.

    e.g. with streamed(queue.put): vol = read_study(folder)   # in a reader thread
    """
    previous = getattr(_STREAM, "consumer", None)
    _STREAM.consumer = consumer
    try:
        yield
    finally:
        _STREAM.consumer = previous


def _take_consumer():
    consumer = getattr(_STREAM, "consumer", None)
    _STREAM.consumer = None
    return consumer


def _first_slot(task) -> int:
    return min((f[1] for f in _as_task(task).frames), default=0)


def _slot_order(tasks: list) -> list[int]:
    """Task indices by the first slot each writes (canonical slice order)."""
    first = [_first_slot(t) for t in tasks]
    return sorted(range(len(tasks)), key=first.__getitem__)


def decode_series(tasks: list, n_slices: int, transfer_syntax: str | None,
                  parallel: bool | None = None) -> tuple[np.ndarray, list, list[str]]:
    """Decode a series to HU (n_slices, rows, cols): (array, (decoder, error) per file, decoders used).

    Compressed series are decoded by worker processes that write into shared memory: faster on
    several cores, and a decoder that crashes on a hostile file takes down a worker, not this
    process. If a worker dies, the series is decoded again here without GDCM (the file that
    crashed it then fails with an error and is skipped); if the pool cannot be used at all, here.
    Files are decoded in canonical slice order; under :func:`streamed` a consumer follows the
    progress.
    """
    from pydicom.uid import UncompressedTransferSyntaxes

    rows, cols = tasks[0][2]
    shape = (n_slices, rows, cols)
    consumer = _take_consumer()
    order = _slot_order(tasks)
    ordered = [tasks[i] for i in order]
    if parallel is None:
        parallel = str(transfer_syntax) not in UncompressedTransferSyntaxes and not IN_WORKER
    results, safe = None, False
    if parallel:
        try:
            results, hu = _decode_parallel(ordered, shape, consumer)
            consumer = None
        except BrokenProcessPool as exc:
            logger.warning("a decode worker died (%s); decoding again in this process without GDCM", exc)
            shutdown_pool()
            safe = True
        except (OSError, RuntimeError, ValueError) as exc:
            logger.warning("parallel decoding failed (%s); decoding in this process", exc)
            shutdown_pool()
    if results is None:
        hu = np.zeros(shape, np.float32)
        progress = None
        if consumer is not None and not safe:
            progress = SeriesProgress(hu, [_first_slot(t) for t in ordered])
            consumer(progress)
        try:
            results = _decode_into(ordered, hu, safe=safe, done=progress.chunk_done if progress else None)
        finally:
            if progress is not None:
                progress.finish()
    back = [None] * len(tasks)
    for k, i in enumerate(order):
        back[i] = results[k]
    return hu, back, sorted({p for p, e in back if not e})


def _decode_parallel(tasks: list, shape: tuple, consumer=None) -> tuple[list, np.ndarray]:
    """Workers write HU into one memory-mapped file (in RAM under /dev/shm where it exists).

    The file is unlinked once they are done; the returned array keeps the mapping, so no copy.
    Chunks of about eight slices (at least four per worker) so that a consumer starts early.
    """
    import tempfile

    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, filename = tempfile.mkstemp(prefix="msnet-", suffix=".f32", dir=folder)
    os.close(fd)
    progress = None
    try:
        hu = np.memmap(filename, np.float32, mode="w+", shape=shape)
        n_chunks = max(4 * _n_workers(), -(-len(tasks) // 8)) if consumer is not None else 4 * _n_workers()
        chunks = _chunks(tasks, n_chunks)
        if consumer is not None:
            progress = SeriesProgress(hu.view(np.ndarray), [_first_slot(c[0]) for c in chunks])
        with _signals_held():
            futures = [_pool().submit(_decode_chunk_mapped, c, filename, shape) for c in chunks]
        if progress is not None:
            def done(f, k: int) -> None:
                if f.cancelled() or f.exception() is not None:
                    progress.finish()  # a chunk whose worker failed is not decoded: the stream ends
                else:
                    progress.chunk_done(k)

            for k, f in enumerate(futures):
                f.add_done_callback(lambda f, k=k: done(f, k))
            consumer(progress)
        results = [r for f in futures for r in f.result()]
    finally:
        if progress is not None:
            progress.finish()
        os.unlink(filename)
    return results, hu.view(np.ndarray)
