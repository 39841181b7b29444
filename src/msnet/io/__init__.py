"""Read a study into a :class:`CTVolume`: DICOM folders/files, NIfTI, MetaImage, 2-D images, a .zip of
any of them, DICOMweb study URLs.

``open_study(source, series=None)`` is the one way in (``read_study`` is the same function): it owns
the sources (a DICOMweb URL, a zip, a path) and hands a path to the first reader of the registry
(:mod:`msnet.io.readers`) that accepts it; a new format is one reader module and one
``register_reader`` call. Conventions (see docs/architecture.md):

- Canonical orientation: slices axial, superior first; rows anterior to posterior; columns from the
  patient's right to left (patient left on image right). DICOM series in any orientation are
  permuted/flipped to it, sagittal and coronal ones resampled to square pixels; planes or a gantry
  tilted more than ``MAX_OBLIQUE_DEG`` (10) are refused (:mod:`msnet.io.orient`).
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
  others are listed in the warnings (by index, modality, SeriesNumber and size: no UID is ever
  written to a warning or a log). ``series=`` picks one by SeriesInstanceUID or by index into the
  series sorted by (SeriesNumber, UID).
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
from msnet.io.archives import unpacked
from msnet.io.decode import quiet_pydicom
from msnet.io.dicomweb import is_dicomweb_url, read_dicomweb
from msnet.io.readers import (ARCHIVE_SUFFIXES, READERS, StudyReader, has_suffix, known_suffixes, read_path,
                              reader_for, register_reader, study_stem)
from msnet.io.stream import StudyStream
from msnet.io.volume import (AIR_HU, OUT_OF_FIELD_HU, CTVolume, ReadLimits, check_volume, describe, read_limits,
                             rescale_hint, set_read_limits)

__all__ = ["AIR_HU", "OUT_OF_FIELD_HU", "CTVolume", "READERS", "ReadLimits", "StudyReader", "StudyStream",
           "check_volume", "default_study_id", "describe", "known_suffixes", "open_study", "read_limits",
           "read_study", "reader_for", "register_reader", "rescale_hint", "set_read_limits"]


def default_study_id(source: str | Path) -> str | None:
    """The id a study is reported under unless one is given: the folder or file name without the suffix
    a reader or an archive knows (``case7.zip``, ``case7.nii.gz``: ``case7``); None for a DICOMweb URL
    (its StudyInstanceUID is used)."""
    if is_dicomweb_url(source):
        return None
    path = Path(source)
    return study_stem(path.name) or str(path)


def open_study(source: str | Path, series: str | int | None = None, study_id: str | None = None) -> CTVolume:
    """Read a study from wherever it is: a DICOM folder or file, a NIfTI / MetaImage file, an image
    folder or file, a .zip of any of these (any case of ``.zip``; checked before extraction, removed
    after), or a DICOMweb study URL (a ``str`` starting with http:// or https://, see
    :mod:`msnet.io.dicomweb`). ``series``: a SeriesInstanceUID or an index (see :mod:`msnet.io.dicom`).

    e.g. vol = open_study("study_folder")
    e.g. vol.hu.shape, vol.z_mm[0] > vol.z_mm[-1]
    ((148, 512, 512), True)
    """
    url = is_dicomweb_url(source)
    path = source if url else Path(source)
    if not url and not path.exists():
        raise MsnetError("no such file or folder", path, "check the path (quote names with spaces)")
    sid = study_id or default_study_id(source)
    try:
        with quiet_pydicom():
            if url:
                vol = read_dicomweb(source, series=series, study_id=study_id)
            elif path.is_file() and has_suffix(path, ARCHIVE_SUFFIXES):
                with unpacked(path) as inner:
                    vol = read_path(inner, sid, series)
            else:
                vol = read_path(path, sid, series)
        return check_volume(vol)
    except MsnetError:
        raise
    except MemoryError as exc:
        raise MsnetError("not enough memory to read the study", path,
                         "lower the read limits (MSNET_MAX_VOXELS) or free memory") from exc
    except Exception as exc:  # a reader failed in a way not foreseen: still name the file
        raise MsnetError(f"cannot read study ({type(exc).__name__}: {exc})", path,
                         "check the files; report the message if they open in a DICOM viewer") from exc


read_study = open_study
"""The same function under its former name (stages and benchmarks read cohort studies with it)."""
