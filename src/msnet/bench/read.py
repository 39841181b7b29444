"""``msnet bench read`` and ``msnet bench decoders``: reading DICOM studies to HU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msnet.bench.common import REPEATS, cores, fmt, repeated, rounded
from msnet.errors import MsnetError
from msnet.io import AIR_HU, OUT_OF_FIELD_HU, read_study
from msnet.io.decode import decode_file, quiet_pydicom
from msnet.io.jpeg import LOSSLESS_DECODERS, _installed, gdcm_direct_ok, lossless_direct
from msnet.io.pixeldata import parse_header, read_pixel_bytes


def _plain_read(study: Path) -> np.ndarray:
    """The reference: one process, pylibjpeg, SliceLocation descending (superior first)."""
    import pydicom
    from pydicom.pixels import pixel_array

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


def bench_read(study: str | Path, repeats: int = REPEATS, console=None) -> dict:
    """Time ``read_study`` against a plain pydicom loop on one study (median of ``repeats`` each); print
    and return the result.

    e.g. bench_read("P001")
    {'n_slices': 148, 'ours_s': 0.6, 'plain_s': 1.8, 'ratio': 3.0, 'equal': True, ...}
    """
    import pydicom

    study = Path(study)
    if not study.is_dir():
        raise MsnetError("not a folder", study, "pass a DICOM study folder")
    with quiet_pydicom():  # cap002's GUID-style UIDs would log one line per file
        plain_t, plain = repeated(lambda: _plain_read(study), repeats)
        ours_t, vol = repeated(lambda: read_study(study), repeats)
    equal = bool(plain.shape == vol.hu.shape and np.array_equal(plain, vol.hu))
    first = next(p for p in sorted(study.rglob("*")) if p.is_file() and p.name.upper() != "DICOMDIR")
    header = pydicom.dcmread(first, stop_before_pixels=True)
    direct = (int(header.Rows), int(header.Columns)) if gdcm_direct_ok(header) else None
    decoder = decode_file(str(first), direct)[1]
    ours_s, plain_s = ours_t["median"], plain_t["median"]
    result = {
        "study": str(study), "n_slices": vol.n_slices, "transfer_syntax": vol.transfer_syntax,
        "cores": cores(), "repeats": repeats, "decoder": decoder,
        "ours_s": round(ours_s, 4), "plain_s": round(plain_s, 4), "ours": rounded(ours_t), "plain": rounded(plain_t),
        "ours_slices_per_s": round(vol.n_slices / ours_s, 1),
        "plain_slices_per_s": round(plain.shape[0] / plain_s, 1),
        "ratio": round(plain_s / ours_s, 2), "equal": equal,
    }
    print_bench_read(result, console)
    if not equal:
        raise MsnetError("read_study and the plain pydicom loop disagree on the HU array", study,
                         "report this with the study's transfer syntax and the versions of pydicom and GDCM")
    return result


def print_bench_read(result: dict, console=None) -> None:
    """Print a bench_read result as a small table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"read {result['n_slices']} slices ({result['transfer_syntax']}), "
                        f"{result['cores']} cores, median (min-max) of {result['repeats']}")
    for col in ("reader", "seconds", "slices/s"):
        table.add_column(col)
    table.add_row(f"msnet.io.read_study ({result['decoder']}, worker processes)",
                  fmt(result["ours"], 3), f"{result['ours_slices_per_s']:.1f}")
    table.add_row("plain pydicom loop (pylibjpeg, 1 process)", fmt(result["plain"], 3),
                  f"{result['plain_slices_per_s']:.1f}")
    console.print(table)
    console.print(f"speed-up plain/ours: {result['ratio']:.2f}x; HU arrays identical: {result['equal']}")


def bench_decoders(studies: list[Path] | None = None, n_files: int = 40, repeats: int = REPEATS,
                   console=None) -> dict:
    """Every installed direct JPEG Lossless decoder (:data:`msnet.io.jpeg.LOSSLESS_DECODERS`) and
    pydicom + pylibjpeg-libjpeg on ``n_files`` files of each of ``studies`` (JPEG Lossless series), one
    thread, the pixel data bytes already read: milliseconds per slice (median of ``repeats``) and
    whether every decoder gives the stored values pydicom + pylibjpeg gives. The first decoder listed is
    the reader's default."""
    import pydicom
    from pydicom.pixels import pixel_array

    studies = [Path(s) for s in studies or []]
    if not studies:
        raise MsnetError("no studies to time", fix="pass JPEG Lossless DICOM study folders")
    files = []
    for study in studies:
        found = sorted(p for p in study.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR")
        files += [found[i] for i in np.linspace(0, len(found) - 1, min(n_files, len(found))).round().astype(int)]
    items, refs = [], []
    for f in files:
        ds = pydicom.dcmread(f)
        if not gdcm_direct_ok(ds):
            continue
        info = parse_header(str(f))[1]
        items.append((str(f), read_pixel_bytes(str(f), info), info, int(ds.Rows), int(ds.Columns)))
        refs.append(pixel_array(ds, decoding_plugin="pylibjpeg"))
    if not items:
        raise MsnetError("no single-frame unsigned 16-bit JPEG Lossless files", studies[0],
                         "pass studies stored as JPEG Lossless (e.g. the COVID-CT-MD scans)")
    rows = {}
    names = [n for n, (_, module) in LOSSLESS_DECODERS.items() if _installed(module)]
    for name in names:
        def run(name=name):
            return [lossless_direct(*item, decoders=(name,))[0] for item in items]
        s, out = repeated(run, repeats)
        rows[name] = {"ms_per_slice": 1e3 * s["median"] / len(items), "spread": s["spread"],
                      "identical": all(np.array_equal(a, b) for a, b in zip(out, refs))}

    def plain():
        return [pixel_array(pydicom.dcmread(item[0]), decoding_plugin="pylibjpeg") for item in items]
    s, _ = repeated(plain, repeats)
    rows["pydicom + pylibjpeg-libjpeg (file parsed again)"] = {"ms_per_slice": 1e3 * s["median"] / len(items),
                                                               "spread": s["spread"], "identical": True}
    result = {"n_slices": len(items), "studies": [s.name for s in studies], "repeats": repeats,
              "default": names[0] if names else None, "decoders": rows}
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"JPEG Lossless decode, {len(items)} slices of {', '.join(result['studies'])}, 1 thread, "
                        f"median of {repeats}")
    for col in ("decoder", "ms / slice", "spread", "stored values identical"):
        table.add_column(col)
    for name, r in rows.items():
        label = f"{name} (default)" if name == result["default"] else name
        table.add_row(label, f"{r['ms_per_slice']:.2f}", f"{100 * r['spread']:.0f} %", str(r["identical"]))
    console.print(table)
    if not all(r["identical"] for r in rows.values()):
        raise MsnetError("a JPEG Lossless decoder disagrees with pydicom + pylibjpeg", studies[0],
                         "report this with the versions of imagecodecs, GDCM and pylibjpeg-libjpeg")
    return result
