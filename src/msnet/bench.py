"""Performance measurements, reported as ratios measured in one run.

``bench_read``: reading a DICOM study to HU with :func:`msnet.io.read_study`
against a plain single-process pydicom loop (dcmread + pixel_array with
pylibjpeg + rescale, sorted by SliceLocation), best of ``repeats`` each.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from msnet.errors import MsnetError

logger = logging.getLogger(__name__)


def _plain_read(study: Path) -> np.ndarray:
    """The reference: one process, pylibjpeg, SliceLocation descending (superior first)."""
    import pydicom
    from pydicom.pixels import pixel_array

    from msnet.io import AIR_HU, OUT_OF_FIELD_HU

    slices = []
    for f in sorted(p for p in Path(study).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if "PixelData" not in ds:
            continue
        arr = pixel_array(ds, decoding_plugin="pylibjpeg")
        hu = arr.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        if slope != 1:
            hu *= np.float32(slope)
        if intercept != 0:
            hu += np.float32(intercept)
        hu[hu < OUT_OF_FIELD_HU] = AIR_HU
        slices.append((float(ds.SliceLocation), hu))
    slices.sort(key=lambda s: -s[0])
    return np.stack([s[1] for s in slices])


def _best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_read(study: str | Path, repeats: int = 2, console=None) -> dict:
    """Time ``read_study`` against a plain pydicom loop on one study; print and return the result.

    >>> bench_read("P001")  # doctest: +SKIP
    {'n_slices': 148, 'ours_s': 0.6, 'plain_s': 1.8, 'ratio': 3.0, 'equal': True, ...}
    """
    from msnet.io import decode_file, read_study

    study = Path(study)
    if not study.is_dir():
        raise MsnetError("not a folder", study, "pass a DICOM study folder")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom\.")
        plain_s, plain = _best(lambda: _plain_read(study), repeats)
        ours_s, vol = _best(lambda: read_study(study), repeats)
    equal = bool(plain.shape == vol.hu.shape and np.array_equal(plain, vol.hu))
    first = next(p for p in sorted(study.rglob("*")) if p.is_file() and p.name.upper() != "DICOMDIR")
    decoder = decode_file(str(first))[1]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    result = {
        "study": str(study), "n_slices": vol.n_slices, "transfer_syntax": vol.transfer_syntax,
        "cores": cores, "repeats": repeats, "decoder": decoder,
        "ours_s": round(ours_s, 4), "plain_s": round(plain_s, 4),
        "ours_slices_per_s": round(vol.n_slices / ours_s, 1),
        "plain_slices_per_s": round(plain.shape[0] / plain_s, 1),
        "ratio": round(plain_s / ours_s, 2), "equal": equal,
    }
    print_bench_read(result, console)
    assert equal, "read_study and the plain pydicom loop disagree on the HU array"
    return result


def print_bench_read(result: dict, console=None) -> None:
    """Print a bench_read result as a small table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"read {result['n_slices']} slices ({result['transfer_syntax']}), "
                        f"{result['cores']} cores, best of {result['repeats']}")
    for col in ("reader", "seconds", "slices/s"):
        table.add_column(col)
    table.add_row(f"msnet.io.read_study ({result['decoder']}, worker processes)",
                  f"{result['ours_s']:.3f}", f"{result['ours_slices_per_s']:.1f}")
    table.add_row("plain pydicom loop (pylibjpeg, 1 process)",
                  f"{result['plain_s']:.3f}", f"{result['plain_slices_per_s']:.1f}")
    console.print(table)
    console.print(f"speed-up plain/ours: {result['ratio']:.2f}x; HU arrays identical: {result['equal']}")
