"""Read a study into a :class:`CTVolume`: DICOM folders/files, NIfTI, 2-D images.

``read_study`` is the single entry point. Conventions (see DESIGN.md):

- Slice order is superior to inferior. DICOM slices are sorted by
  ImagePositionPatient projected on the slice normal (cross product of the
  ImageOrientationPatient row and column cosines, its sign chosen so that it
  points to the head); then SliceLocation (descending); InstanceNumber only as
  a last resort, with a warning. File names are never used.
- HU = stored x RescaleSlope + RescaleIntercept (float32). Stored values equal
  to PixelPaddingValue (or within PixelPaddingRangeLimit) and HU values below
  ``OUT_OF_FIELD_HU`` (-1124, e.g. Toshiba's -2048 outside the field of view)
  are set to air, -1000 HU. The same floor applies to NIfTI volumes.
- Several series in a folder: the axial CT image series with the most
  slices is read (localizers, SR, dose reports and secondary captures never are); the
  others are listed in the warnings. ``series=`` picks one by
  SeriesInstanceUID or by index into the series sorted by (SeriesNumber, UID).
- A file of the chosen series that cannot be decoded is skipped with a
  warning when other files decode; when none decodes, MsnetError is raised.
- Compressed pixel data (8 files or more) is decoded by worker processes, one
  per core, started once per process with ``fork``; they write HU straight
  into one memory-mapped array (under /dev/shm). Threads would not help:
  neither decoder releases the GIL. GDCM is the first decoder (about 1.4x
  faster than pylibjpeg on JPEG Lossless through pydicom, 2.3x when GDCM's
  region reader decodes an unsigned 16-bit JPEG Lossless file straight into a
  buffer, without a pydicom pass); each file falls back to pylibjpeg and then
  to any pydicom decoder.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msnet.errors import MsnetError

logger = logging.getLogger(__name__)

AIR_HU = -1000.0
OUT_OF_FIELD_HU = -1124.0  # anything below -1024 HU minus a 100 HU margin is not tissue
PLAUSIBLE_MAX_HU = 4000.0
IMAGE_TYPES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "ECT": "1.2.840.10008.5.1.4.1.1.2.1",
               "LECT": "1.2.840.10008.5.1.4.1.1.2.2"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DECODERS = ("gdcm", "pylibjpeg", "")  # "" lets pydicom try every plugin it has
_SKIP_NAMES = {"DICOMDIR"}
_CONVERT_FIX = "convert the files to an uncompressed transfer syntax (e.g. `gdcmconv --raw IN OUT`)"


@dataclass
class CTVolume:
    """A study as slices in canonical order (superior to inferior).

    >>> v = CTVolume(np.zeros((2, 4, 4), np.float32), (2.0, 0.7, 0.7), np.array([0.0, -2.0]), "s", "x")
    >>> v.n_slices
    2
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    z_mm: np.ndarray
    study_id: str
    source: str
    kind: str = "hu"
    warnings: list[str] = field(default_factory=list)
    transfer_syntax: str | None = None
    n_series: int = 1
    series_uid: str | None = None

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


def describe(vol: CTVolume) -> dict:
    """A JSON-serialisable summary of a volume (what ``msnet inspect`` prints)."""
    return {
        "study_id": vol.study_id,
        "n_slices": vol.n_slices,
        "shape": [int(s) for s in vol.hu.shape],
        "spacing_mm": [float(s) for s in vol.spacing_mm],
        "z_mm": [round(float(z), 3) for z in vol.z_mm],
        "hu_min": float(vol.hu.min()) if vol.hu.size else 0.0,
        "hu_max": float(vol.hu.max()) if vol.hu.size else 0.0,
        "kind": vol.kind,
        "transfer_syntax": vol.transfer_syntax,
        "n_series": int(vol.n_series),
        "warnings": list(vol.warnings),
    }


def read_study(path: str | Path, series: str | int | None = None, study_id: str | None = None) -> CTVolume:
    """Read a DICOM folder/file, a NIfTI file, an image folder or an image file.

    >>> vol = read_study("study_folder")  # doctest: +SKIP
    >>> vol.hu.shape, vol.z_mm[0] > vol.z_mm[-1]  # doctest: +SKIP
    ((148, 512, 512), True)
    """
    path = Path(path)
    if not path.exists():
        raise MsnetError("no such file or folder", path, "check the path (quote names with spaces)")
    try:
        with _quiet_pydicom():
            return _read_any(path, study_id or _stem(path), series)
    except MsnetError:
        raise
    except Exception as exc:  # a reader failed in a way not foreseen: still name the file
        raise MsnetError(f"cannot read study ({type(exc).__name__}: {exc})", path,
                         "check the files; report the message if they open in a DICOM viewer") from exc


@contextlib.contextmanager
def _quiet_pydicom():
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


def _read_any(path: Path, sid: str, series) -> CTVolume:
    if path.is_file():
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return _read_nifti(path, sid)
        header = _read_header(path)
        if header is not None:
            return _read_dicom([(path, header)], [], path, sid, series)
        if _is_image(path):
            return _read_images([path], path, sid)
        raise MsnetError("not a DICOM, NIfTI or image file", path,
                         "pass a DICOM series folder, a .nii/.nii.gz file or an image")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MsnetError("empty folder", path, "point to the folder that holds the study's files")
    headers, others = [], []
    for f in files:
        if f.name.upper() in _SKIP_NAMES:
            continue
        h = _read_header(f)
        (headers.append((f, h)) if h is not None else others.append(f))
    if headers:
        return _read_dicom(headers, others, path, sid, series)
    images = [f for f in others if _is_image(f)]
    if images:
        images.sort(key=lambda p: _natural_key(str(p.relative_to(path))))
        vol = _read_images(images, path, sid)
        skipped = len(others) - len(images)
        if skipped:
            vol.warnings.append(f"{skipped} files that are not images were skipped")
        return vol
    nifti = [f for f in others if f.name.lower().endswith(NIFTI_SUFFIXES)]
    fix = f"pass the NIfTI file itself ({nifti[0].name})" if nifti else \
        "point to a folder of DICOM files (any names, searched recursively) or of PNG/JPEG/TIFF images"
    raise MsnetError(f"no DICOM files or images among {len(others)} files", path, fix)


# --------------------------------------------------------------------------- DICOM


def _read_header(path: Path):
    """The dataset without pixel data, or None when the file is not DICOM."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM, truncated header, unreadable: the caller decides
        return None


def _series_key(ds) -> str:
    return str(ds.get("SeriesInstanceUID", "") or "")


def _series_info(uid: str, members: list) -> dict:
    ds = members[0][1]
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "") or "")
    is_image = sop in IMAGE_TYPES.values() or (modality == "CT" and not sop.startswith(
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.104")))
    n = sum(int(m[1].get("NumberOfFrames", 1) or 1) for m in members)
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = 10**9
    iop = ds.get("ImageOrientationPatient")
    axial = True
    if iop is not None and len(iop) == 6:
        normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
        axial = bool(abs(normal[2]) >= 0.7 * (np.linalg.norm(normal) or 1.0))
    return {"uid": uid, "files": members, "modality": modality or "?", "n": n, "number": number, "axial": axial,
            "ct": is_image and (modality in ("CT", "") or sop in IMAGE_TYPES.values()),
            "localizer": "LOCALIZER" in image_type, "is_image": is_image}


def _choose_series(headers: list, series, source: Path) -> tuple[dict, list[str], int]:
    groups: dict[str, list] = {}
    for f, ds in headers:
        groups.setdefault(_series_key(ds), []).append((f, ds))
    infos = sorted((_series_info(u, m) for u, m in groups.items()), key=lambda i: (i["number"], i["uid"]))
    listing = "; ".join(f"[{k}] {i['modality']} {i['n']} slices UID {i['uid'] or '(none)'}"
                        for k, i in enumerate(infos))
    notes: list[str] = []
    if series is not None:
        chosen = next((i for i in infos if i["uid"] == str(series)), None)
        if chosen is None and str(series).strip().lstrip("-").isdigit():
            k = int(series)
            chosen = infos[k] if -len(infos) <= k < len(infos) else None
        if chosen is None:
            raise MsnetError(f"series {series!r} not found; series here: {listing}", source,
                             "pass one of the UIDs or indices listed")
        if not chosen["ct"] or chosen["localizer"]:
            if not chosen["is_image"] or chosen["modality"] not in ("CT", "?"):
                raise MsnetError(f"series {series!r} is {chosen['modality']}, not a CT image series",
                                 source, "choose a CT image series")
            notes.append(f"series {series!r} is a localizer/scout, read as asked")
    else:
        candidates = [i for i in infos if i["ct"] and not i["localizer"]]
        if not candidates:
            mods = sorted({i["modality"] for i in infos})
            raise MsnetError(f"no CT image series found (modalities: {', '.join(mods)}; series: {listing})",
                             source, "point to a CT study (localizers, SR and secondary captures are not read)")
        chosen = max(candidates, key=lambda i: (i["axial"], i["n"], -i["number"]))
    if len(infos) > 1:
        k = infos.index(chosen)
        notes.append(f"{len(infos)} series found, read [{k}]; series: {listing}; "
                     "pass series=UID or index to read another")
    return chosen, notes, len(infos)


def _read_dicom(headers: list, others: list, source: Path, sid: str, series) -> CTVolume:
    chosen, notes, n_series = _choose_series(headers, series, source)
    if others:
        shown = ", ".join(p.name for p in others[:3]) + (" ..." if len(others) > 3 else "")
        notes.insert(0, f"{len(others)} non-DICOM files skipped ({shown})")
    files, seen = [], set()
    for f, ds in chosen["files"]:
        sop = str(ds.get("SOPInstanceUID", "")) or str(f)
        if sop in seen:
            notes.append(f"{f.name}: duplicate SOPInstanceUID, skipped")
            continue
        seen.add(sop)
        files.append((f, ds))
    ts = str(getattr(files[0][1], "file_meta", {}).get("TransferSyntaxUID", "") or "") or None
    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for _, ds in files}
    if len(sizes) > 1:
        raise MsnetError(f"slices of different sizes in one series: {sorted(sizes)}", source,
                         "pass series= to pick a single series, or remove the odd files")
    rows, cols = sizes.pop()
    slices = []  # (file index, frame index or None)
    for i, (_, ds) in enumerate(files):
        n_frames = int(ds.get("NumberOfFrames") or 1)
        multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
        slices.extend((i, k if multi else None) for k in range(n_frames))
    geo = [_frame_geometry(files[i][1], k) for i, k in slices]
    order, z, step, geo_notes = _sort_slices(geo)
    slot = np.empty(len(slices), int)
    slot[order] = np.arange(len(slices))
    try:
        import gdcm  # noqa: F401

        direct = [_gdcm_direct_ok(ds) for _, ds in files]
    except ImportError:
        direct = [False] * len(files)
    tasks: list[tuple] = [(str(f), [], (rows, cols), d) for (f, _), d in zip(files, direct)]
    for j, (i, k) in enumerate(slices):
        ds = files[i][1]
        pad, lim = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
        tasks[i][1].append((k, int(slot[j]), geo[j]["slope"], geo[j]["intercept"],
                            None if pad is None else int(pad), None if lim is None else int(lim)))
    hu, results, decoders = decode_series(tasks, len(slices), ts)
    failures = [(files[i][0], err) for i, (_, err) in enumerate(results) if err]
    if len(failures) == len(files):
        f, err = failures[0]
        fix = "re-export the study from the scanner or archive"
        if "decode" in err.lower() or "plugin" in err.lower() or "support" in err.lower():
            fix = f"transfer syntax {ts} cannot be decoded here: {_CONVERT_FIX}"
        raise MsnetError(f"no slice could be decoded ({len(failures)} files); first error: {err}", f, fix)
    if failures:
        bad = {slot[j] for j, (i, _) in enumerate(slices) if results[i][1]}
        keep = np.array([k not in bad for k in range(len(slices))])
        hu, z = hu[keep], z[keep]
        geo_notes = _sort_slices([geo[j] for j in order if slot[j] not in bad])[3]
        notes += [f"{f.name}: skipped, pixel data could not be decoded ({err})" for f, err in failures]
    row_mm, col_mm = geo[order[0]]["pixel_mm"]
    if geo[order[0]]["pixel_mm_missing"]:
        geo_notes.append("PixelSpacing missing: 1 mm assumed")
    vol = CTVolume(hu=hu, spacing_mm=(float(step), float(row_mm), float(col_mm)), z_mm=np.asarray(z, float),
                   study_id=sid, source=str(source), kind="hu", warnings=notes + geo_notes,
                   transfer_syntax=ts, n_series=n_series, series_uid=chosen["uid"] or None)
    logger.debug("read %d slices of %s (decoder %s)", vol.n_slices, sid, ", ".join(decoders))
    _check_range(vol)
    return vol


def to_hu(stored: np.ndarray, slope: float, intercept: float, padding=None, padding_limit=None,
          out: np.ndarray | None = None) -> np.ndarray:
    """Stored values to HU (float32), padding and out-of-field pixels set to air.

    >>> to_hu(np.array([[0, 1024, 63536]], np.uint16), 1.0, -1024.0, padding=63536).tolist()
    [[-1000.0, 0.0, -1000.0]]
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


def _frame_geometry(ds, frame: int | None) -> dict:
    """Position, orientation, spacing and rescale of one slice (classic or per-frame)."""
    items = [ds]
    if frame is not None:
        for seq in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            groups = ds.get(seq)
            if groups:
                items.append(groups[frame] if seq.startswith("PerFrame") and len(groups) > frame else groups[0])

    def find(seq_name, tag, default=None):
        for it in items[1:]:
            seq = it.get(seq_name)
            if seq and tag in seq[0] and seq[0].get(tag) not in (None, ""):
                return seq[0].get(tag)
        value = ds.get(tag)
        return default if value in (None, "") else value

    ipp = find("PlanePositionSequence", "ImagePositionPatient")
    iop = find("PlaneOrientationSequence", "ImageOrientationPatient")
    px = find("PixelMeasuresSequence", "PixelSpacing")
    return {"ipp": None if ipp is None else np.array([float(v) for v in ipp]),
            "iop": None if iop is None else np.array([float(v) for v in iop]),
            "loc": None if ds.get("SliceLocation") in (None, "") or frame is not None else float(ds.SliceLocation),
            "inst": int(ds.get("InstanceNumber") or 0) * 10000 + (frame or 0),
            "slope": float(find("PixelValueTransformationSequence", "RescaleSlope", 1.0)),
            "intercept": float(find("PixelValueTransformationSequence", "RescaleIntercept", 0.0)),
            "pixel_mm": (float(px[0]), float(px[1])) if px else (1.0, 1.0), "pixel_mm_missing": not px,
            "thickness": find("PixelMeasuresSequence", "SliceThickness")}


def _sort_slices(geo: list[dict]) -> tuple[list[int], np.ndarray, float, list[str]]:
    """Order (superior first), z_mm per slice, slice step, and warnings."""
    notes: list[str] = []
    n = len(geo)
    if all(g["ipp"] is not None and g["iop"] is not None and len(g["iop"]) == 6 for g in geo):
        iop = geo[0]["iop"]
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal) or 1.0
        if normal[2] < 0:
            normal = -normal  # point to the head (+z in LPS)
        pos = np.array([g["ipp"] @ normal for g in geo])
        tilt = np.degrees(np.arccos(min(1.0, abs(normal[2]))))
        if tilt > 45:
            notes.append(f"non-axial orientation (slice normal {np.round(normal, 3).tolist()}); "
                         "slices ordered along the normal")
        elif tilt > 1:
            notes.append(f"oblique slices: normal {tilt:.1f} degrees from the patient z axis")
        if any(not np.allclose(g["iop"], iop, atol=1e-3) for g in geo):
            notes.append("ImageOrientationPatient differs between slices")
    elif all(g["loc"] is not None for g in geo):
        pos = np.array([g["loc"] for g in geo])
        notes.append("no ImagePositionPatient/ImageOrientationPatient: sorted by SliceLocation")
    else:
        pos = -np.array([g["inst"] for g in geo], float)
        notes.append("no slice geometry: sorted by InstanceNumber (1 assumed to be the top slice)")
        order = list(np.argsort(-pos, kind="stable"))
        t = geo[0]["thickness"]
        step = float(t) if t else 1.0
        return order, -np.arange(n) * step, step, notes
    order = list(np.argsort(-pos, kind="stable"))
    z = pos[order]
    steps = -np.diff(z)
    if n < 2:
        t = geo[0]["thickness"]
        return order, z, float(t) if t else 1.0, notes
    if np.any(steps < 1e-3):
        notes.append(f"{int(np.sum(steps < 1e-3))} duplicate slice positions")
    pos_steps = steps[steps >= 1e-3]
    step = float(np.median(pos_steps)) if pos_steps.size else 1.0
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        notes.append(f"{gaps.size} gaps in slice positions (largest {steps.max():.2f} mm, median step {step:.2f} mm)")
    elif pos_steps.size and np.max(np.abs(pos_steps - step)) > max(0.01 * step, 1e-3):
        notes.append(f"uneven slice steps ({pos_steps.min():.3f}..{pos_steps.max():.3f} mm)")
    if geo[0]["ipp"] is not None and geo[0]["iop"] is not None and n >= 2:
        d = geo[order[-1]]["ipp"] - geo[order[0]]["ipp"]
        if np.linalg.norm(d) > 1e-6:
            iop = geo[0]["iop"]
            nn = np.cross(iop[:3], iop[3:])
            cosang = abs(d @ nn) / (np.linalg.norm(d) * (np.linalg.norm(nn) or 1.0))
            angle = np.degrees(np.arccos(min(1.0, cosang)))
            if angle > 0.5:
                notes.append(f"gantry tilt: slice positions progress {angle:.1f} degrees off the slice normal")
    return order, z, step, notes


# --------------------------------------------------------------------------- decoding


_GDCM_DIRECT_SYNTAXES = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # JPEG Lossless


def _gdcm_direct_ok(ds) -> bool:
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

    ``direct=(rows, cols)``: try GDCM on the file first (for files where ``_gdcm_direct_ok``).
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
        with _quiet_pydicom():
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
        atexit.register(_shutdown_pool)
    return _POOL


def _shutdown_pool() -> None:
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
            _shutdown_pool()
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


# --------------------------------------------------------------------------- NIfTI, images


def _read_nifti(path: Path, sid: str) -> CTVolume:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise MsnetError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path,
                         "check that the file is a complete .nii/.nii.gz") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MsnetError(f"NIfTI has {data.ndim} dimensions, expected 3", path, "pass a 3-D CT volume")
    notes = []
    lin = img.affine[:3, :3]
    if np.count_nonzero(np.abs(lin) > 1e-6 * np.abs(lin).max()) > 3:
        notes.append("oblique NIfTI affine: reoriented to the closest axial orientation")
    # RAS: x to the right, y to anterior, z to superior. Slices superior first; rows anterior
    # to posterior, columns patient right to left (the DICOM display convention).
    hu = np.ascontiguousarray(data.transpose(2, 1, 0)[::-1, ::-1, ::-1], dtype=np.float32)
    hu[hu < OUT_OF_FIELD_HU] = AIR_HU
    zx, zy, zz = (float(z) for z in img.header.get_zooms()[:3])
    k = np.arange(data.shape[2])[::-1]
    z = img.affine[2, 2] * k + img.affine[2, 3]
    vol = CTVolume(hu=hu, spacing_mm=(zz, zy, zx), z_mm=z.astype(float), study_id=sid, source=str(path),
                   kind="hu", warnings=notes, transfer_syntax=None, n_series=1, series_uid=None)
    _check_range(vol)
    return vol


def _is_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def _read_images(paths: list[Path], source: Path, sid: str) -> CTVolume:
    from PIL import Image

    slices, notes, size = [], [], None
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L")
                if size is None:
                    size = im.size
                elif im.size != size:
                    notes.append(f"{p.name}: {im.size[0]}x{im.size[1]} resized to {size[0]}x{size[1]}")
                    im = im.resize(size, Image.BILINEAR)
                slices.append(np.asarray(im, dtype=np.float32))
        except Exception as exc:
            raise MsnetError(f"cannot read image ({type(exc).__name__}: {exc})", p,
                             "remove or re-save the file (PNG, JPEG or TIFF)") from exc
    hu = np.stack(slices)
    return CTVolume(hu=hu, spacing_mm=(1.0, 1.0, 1.0), z_mm=-np.arange(len(slices), dtype=float),
                    study_id=sid, source=str(source), kind="grey", warnings=notes, n_series=1)


# --------------------------------------------------------------------------- helpers


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or str(path)


def _natural_key(text: str) -> list:
    """'img2' sorts before 'img10'.

    >>> sorted(["img10", "img2"], key=_natural_key)
    ['img2', 'img10']
    """
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _check_range(vol: CTVolume) -> None:
    hi = float(vol.hu.max()) if vol.hu.size else 0.0
    if hi > PLAUSIBLE_MAX_HU:
        vol.warnings.append(f"HU maximum {hi:.0f} is above {PLAUSIBLE_MAX_HU:.0f}: check RescaleSlope/"
                            "Intercept and PixelRepresentation (signedness) of the files")
