"""Read a study into a :class:`CTVolume`: DICOM folders/files, NIfTI, MetaImage, 2-D images, DICOMweb study URLs.

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
- A DICOMweb URL (:mod:`msnet.io.dicomweb`) is read like a folder: the series is chosen from the
  study's metadata, then only its instances are fetched into a temporary folder.
- A file of the chosen series that cannot be decoded is skipped with a
  warning when other files decode; when none decodes, MsnetError is raised.
- Every volume passes :func:`check_volume` before it is returned: NaN or infinite voxels, a
  constant or near-constant volume (e.g. RescaleSlope 0) and HU that cannot be CT are refused
  with MsnetError; odd ranges are warned. Sizes are checked on the headers against
  :func:`read_limits` (``MSNET_MAX_SLICE_PIXELS``, ``MSNET_MAX_VOXELS``,
  ``MSNET_MAX_COMPRESSION_RATIO``, or :func:`set_read_limits`) before anything is allocated;
  over a limit raises :class:`msnet.errors.LimitError`.
- A file inside a study folder that is a link to a place outside the folder is read, with a
  warning.
- Compressed pixel data (8 files or more) is decoded by worker processes, one
  per core, started once per process with ``fork``; they write HU straight
  into one memory-mapped array (under /dev/shm). Threads would not help:
  neither decoder releases the GIL. GDCM is the first decoder (about 1.4x
  faster than pylibjpeg on JPEG Lossless through pydicom, 2.3x when GDCM's
  region reader decodes an unsigned 16-bit JPEG Lossless file straight into a
  buffer, without a pydicom pass); each file falls back to pylibjpeg and then
  to any pydicom decoder.
- Streamed: files are decoded in canonical slice order, so a consumer can start on the first
  slices while the rest are decoded (:class:`msnet.io.stream.StudyStream`, which ``msnet predict``
  uses to overlap decoding with the backbone).
"""

from __future__ import annotations

from pathlib import Path

from msnet.errors import MsnetError
from msnet.io.decode import quiet_pydicom
from msnet.io.dicom import read_dicom, read_header, read_headers
from msnet.io.dicomweb import is_dicomweb_url, read_dicomweb
from msnet.io.images import is_image, natural_key, read_images
from msnet.io.metaimage import METAIMAGE_SUFFIXES, read_metaimage
from msnet.io.nifti import NIFTI_SUFFIXES, read_nifti
from msnet.io.stream import StudyStream
from msnet.io.volume import (AIR_HU, OUT_OF_FIELD_HU, CTVolume, ReadLimits, check_volume, describe, read_limits,
                             set_read_limits)

__all__ = ["AIR_HU", "OUT_OF_FIELD_HU", "CTVolume", "ReadLimits", "StudyStream", "check_volume", "describe",
           "read_limits", "read_study", "set_read_limits"]

_SKIP_NAMES = {"DICOMDIR"}


def read_study(path: str | Path, series: str | int | None = None, study_id: str | None = None) -> CTVolume:
    """Read a DICOM folder/file, a NIfTI file, an image folder or an image file, or a DICOMweb
    study URL (a ``str`` starting with http:// or https://, see :mod:`msnet.io.dicomweb`).

    e.g. vol = read_study("study_folder")
    e.g. vol.hu.shape, vol.z_mm[0] > vol.z_mm[-1]
    ((148, 512, 512), True)
    """
    url = is_dicomweb_url(path)
    if not url:
        path = Path(path)
        if not path.exists():
            raise MsnetError("no such file or folder", path, "check the path (quote names with spaces)")
    try:
        with quiet_pydicom():
            if url:
                vol = read_dicomweb(path, series=series, study_id=study_id)
            else:
                vol = _read_any(path, study_id or _stem(path), series)
        return check_volume(vol)
    except MsnetError:
        raise
    except MemoryError as exc:
        raise MsnetError("not enough memory to read the study", path,
                         "lower the read limits (MSNET_MAX_VOXELS) or free memory") from exc
    except Exception as exc:  # a reader failed in a way not foreseen: still name the file
        raise MsnetError(f"cannot read study ({type(exc).__name__}: {exc})", path,
                         "check the files; report the message if they open in a DICOM viewer") from exc


def _read_any(path: Path, sid: str, series) -> CTVolume:
    if path.is_file():
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return read_nifti(path, sid)
        if path.name.lower().endswith(METAIMAGE_SUFFIXES):
            return read_metaimage(path, sid)
        header = read_header(path)
        if header is not None:
            return read_dicom([(path, header)], [], path, sid, series)
        if is_image(path):
            return read_images([path], path, sid)
        raise MsnetError("not a DICOM, NIfTI, MetaImage or image file", path,
                         "pass a DICOM series folder, a .nii/.nii.gz or .mha file or an image")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise MsnetError("empty folder", path, "point to the folder that holds the study's files")
    outside = _links_outside(path, files)
    vol = _read_folder(path, files, sid, series)
    if outside:
        shown = ", ".join(str(p.relative_to(path)) for p in outside[:3]) + (" ..." if len(outside) > 3 else "")
        vol.warnings.append(f"{len(outside)} files are links to places outside the study folder ({shown}): "
                            "read anyway; check that they belong to this study")
    return vol


def _links_outside(root: Path, files: list[Path]) -> list[Path]:
    """Files that resolve (through a link to the file or to a folder above it) outside ``root``."""
    base = root.resolve()
    out = []
    for f in files:
        try:
            f.resolve().relative_to(base)
        except ValueError:
            out.append(f)
    return out


def _read_folder(path: Path, files: list[Path], sid: str, series) -> CTVolume:
    headers, others = [], []
    files = [f for f in files if f.name.upper() not in _SKIP_NAMES]
    for f, h in zip(files, read_headers(files)):
        (headers.append((f, h)) if h is not None else others.append(f))
    if headers:
        return read_dicom(headers, others, path, sid, series)
    images = [f for f in others if is_image(f)]
    if images:
        images.sort(key=lambda p: natural_key(str(p.relative_to(path))))
        vol = read_images(images, path, sid)
        skipped = len(others) - len(images)
        if skipped:
            vol.warnings.append(f"{skipped} files that are not images were skipped")
        return vol
    nifti = [f for f in others if f.name.lower().endswith(NIFTI_SUFFIXES + METAIMAGE_SUFFIXES)]
    fix = f"pass the NIfTI file itself ({nifti[0].name})" if nifti else \
        "point to a folder of DICOM files (any names, searched recursively) or of PNG/JPEG/TIFF images"
    raise MsnetError(f"no DICOM files or images among {len(others)} files", path, fix)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or str(path)


