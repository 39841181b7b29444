"""Pixel data to HU: GDCM / pylibjpeg decoders and a pool of worker processes writing into shared memory.

Public API: :func:`decode_file` (one file), :func:`decode_series` (a series into one array),
:func:`to_hu`, :func:`quiet_pydicom`, :func:`shutdown_pool`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from msnet.io.volume import AIR_HU, OUT_OF_FIELD_HU

logger = logging.getLogger(__name__)

DECODERS = ("gdcm", "pylibjpeg", "")  # "" lets pydicom try every plugin it has


@contextlib.contextmanager
def quiet_pydicom():
    """No pydicom warnings or log lines about invalid values (e.g. GUID-style UIDs) while reading."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom\.")
            yield
    finally:
        config.settings.reading_validation_mode = old


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
    if float(out.min()) < OUT_OF_FIELD_HU:
        out[out < OUT_OF_FIELD_HU] = AIR_HU
    return out


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


_GDCM_DIRECT_SYNTAXES = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # JPEG Lossless


def gdcm_direct_ok(ds) -> bool:
    """Single-frame unsigned 16-bit grey JPEG Lossless: GDCM reads the file itself (no pydicom pass)."""
    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    return (ts in _GDCM_DIRECT_SYNTAXES and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("BitsAllocated", 0)) == 16 and int(ds.get("PixelRepresentation", 1)) == 0
            and int(ds.get("NumberOfFrames") or 1) == 1)


def _gdcm_direct(path: str, rows: int, cols: int) -> np.ndarray:
    """GDCM decodes the whole file straight into a buffer (no str round trip, no pydicom pass)."""
    import gdcm

    reader = gdcm.ImageRegionReader()
    reader.SetFileName(path)
    if not reader.ReadInformation():
        raise ValueError("GDCM could not read the file")
    dims = gdcm.ImageHelper.GetDimensionsValue(reader.GetFile())
    pixel_format = gdcm.ImageHelper.GetPixelFormatValue(reader.GetFile())
    if tuple(dims)[:2] != (cols, rows) or pixel_format.GetScalarType() != gdcm.PixelFormat.UINT16:
        raise ValueError("unexpected size or pixel format")
    box = gdcm.BoxRegion()
    box.SetDomain(0, cols - 1, 0, rows - 1, 0, 0)
    reader.SetRegion(box)
    buf = bytearray(reader.ComputeBufferLength())
    if len(buf) != rows * cols * 2 or not reader.ReadIntoBuffer(buf):
        raise ValueError("GDCM could not decode the pixel data")
    return np.frombuffer(buf, np.uint16).reshape(rows, cols)


def decode_file(path: str, direct: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str, str | None]:
    """Stored pixel values of one file: (array or None, decoder used, error text).

    ``direct=(rows, cols)``: try GDCM on the file first (for files where ``gdcm_direct_ok``).
    Then GDCM, pylibjpeg and any pydicom decoder through pydicom, per file.
    """
    if direct is not None:
        try:
            return _gdcm_direct(path, *direct), "gdcm-region", None
        except Exception as exc:  # fall back to pydicom below
            logger.debug("%s: direct GDCM failed (%s)", path, exc)
    import pydicom
    from pydicom.pixels import pixel_array
    from pydicom.uid import UncompressedTransferSyntaxes

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception as exc:
        return None, "", f"unreadable ({type(exc).__name__}: {exc})"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return None, "", "no pixel data"
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    plugins = ("native",) if ts in UncompressedTransferSyntaxes else DECODERS
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


def _decode_into(tasks: list, out: np.ndarray) -> list[tuple[str, str | None]]:
    """Decode each task's file and write its frames, as HU, to their slots of ``out``."""
    results = []
    for path, frames, (rows, cols), direct in tasks:
        arr, plugin, err = decode_file(path, (rows, cols) if direct else None)
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


def _n_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def _pool() -> ProcessPoolExecutor:
    global _POOL
    if _POOL is None:
        # fork: workers need no re-import of the caller's __main__ (spawn/forkserver would re-run
        # unguarded scripts); they only run pydicom/GDCM code.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _POOL = ProcessPoolExecutor(_n_workers(), mp_context=multiprocessing.get_context(method))
        atexit.register(shutdown_pool)
    return _POOL


def shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = None


def decode_series(tasks: list, n_slices: int, transfer_syntax: str | None,
                  parallel: bool | None = None) -> tuple[np.ndarray, list, list[str]]:
    """Decode a series to HU (n_slices, rows, cols): (array, (decoder, error) per file, decoders used).

    Compressed series of 8 or more files are decoded by worker processes that
    write into shared memory; otherwise (or if that fails) in this process.
    """
    from pydicom.uid import UncompressedTransferSyntaxes

    rows, cols = tasks[0][2]
    shape = (n_slices, rows, cols)
    if parallel is None:
        parallel = (len(tasks) >= 8 and _n_workers() > 1
                    and str(transfer_syntax) not in UncompressedTransferSyntaxes)
    results = None
    if parallel:
        try:
            results, hu = _decode_parallel(tasks, shape)
        except (BrokenProcessPool, OSError, RuntimeError, ValueError) as exc:
            logger.warning("parallel decoding failed (%s); decoding in this process", exc)
            shutdown_pool()
    if results is None:
        hu = np.zeros(shape, np.float32)
        results = _decode_into(tasks, hu)
    return hu, results, sorted({p for p, e in results if not e})


def _decode_parallel(tasks: list, shape: tuple) -> tuple[list, np.ndarray]:
    """Workers write HU into one memory-mapped file (in RAM under /dev/shm where it exists).

    The file is unlinked once they are done; the returned array keeps the mapping, so no copy.
    """
    import tempfile

    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, filename = tempfile.mkstemp(prefix="msnet-", suffix=".f32", dir=folder)
    os.close(fd)
    try:
        hu = np.memmap(filename, np.float32, mode="w+", shape=shape)
        n_chunks = min(len(tasks), 4 * _n_workers())
        chunks = [tasks[i * len(tasks) // n_chunks:(i + 1) * len(tasks) // n_chunks] for i in range(n_chunks)]
        futures = [_pool().submit(_decode_chunk_mapped, c, filename, shape) for c in chunks]
        results = [r for f in futures for r in f.result()]
    finally:
        os.unlink(filename)
    return results, hu.view(np.ndarray)


