"""Real-scan cases built at run time from the shared COVID-CT-MD scans: a small axial copy of a real
scan (normal001, downsampled: every 2nd slice, 2 x 2 pixel means) written back as DICOM series in other
orientations, mirrored, mis-tagged or without its intercept. Nothing here is shipped or downloaded."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import NORMAL001

IDENTIFIERS = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-2741-X", "PatientBirthDate": "19430521",
               "AccessionNumber": "ACC90817", "InstitutionName": "St Example Infirmary", "StudyDate": "20200317",
               "StudyTime": "101112", "ReferringPhysicianName": "Roe^Richard", "StationName": "CTROOM7",
               "StudyID": "S7781", "DeviceSerialNumber": "SN55127"}
"""Identifying values planted in every case: none of them may appear in any log."""


SHRINK = 2
"""Pixels of the real scan averaged into one (2: 256 x 256 slices, above the models' input size, so that a
reformat at half the resolution loses about what the model's own resizing loses)."""


@lru_cache(maxsize=1)
def base_volume() -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """normal001 as (HU (z, y, x) superior first, spacing (z, y, x) mm, origin (x, y, z) of voxel 0), small."""
    from msnet.io import read_study

    vol = read_study(NORMAL001)
    hu = vol.hu[::2]
    z, y, x = hu.shape
    f = SHRINK
    hu = hu[:, : y // f * f, : x // f * f].reshape(z, y // f, f, x // f, f).mean(axis=(2, 4)).astype(np.float32)
    spacing = (2 * vol.spacing_mm[0], f * vol.spacing_mm[1], f * vol.spacing_mm[2])
    ipp = [float(v) for v in vol.dicom_headers.ImagePositionPatient]
    c = (f - 1) / 2  # the centre of the first block of pixels
    origin = np.array([ipp[0] + c * vol.spacing_mm[2], ipp[1] + c * vol.spacing_mm[1], float(vol.z_mm[0])])
    return hu, spacing, origin


def write_series(folder: Path, images: np.ndarray, iop, ipps, pixel_mm, modality: str = "CT",
                 intercept: float = -1024.0, series_uid: str | None = None, study_uid: str | None = None,
                 series_number: int = 2, shuffle: bool = True) -> Path:
    """Write ``images`` (n, rows, cols) of HU as a CT series: uncompressed, signed 16-bit, one file per
    image with its IPP, the given IOP and PixelSpacing (row, column), and the :data:`IDENTIFIERS`."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.round(images - intercept).astype(np.int16)
    order = np.random.default_rng(0).permutation(len(images)) if shuffle else np.arange(len(images))
    for k in range(len(images)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = series_number, int(order[k]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for key, value in IDENTIFIERS.items():
            setattr(ds, key, value)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipps[k]]
        ds.PixelSpacing = [round(float(pixel_mm[0]), 5), round(float(pixel_mm[1]), 5)]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(folder / f"img{int(order[k]):04d}.dcm", enforce_file_format=True)
    return folder


def axial(folder: Path, mirror: str | None = None, **kw) -> Path:
    """The base volume as an axial series. ``mirror``: None; ``"stored"`` (columns stored from the
    patient's left, IOP says so: the same anatomy); ``"anatomy"`` (pixels flipped left-right, header
    unchanged: a mirrored patient); ``"rows"`` (rows stored from posterior, IOP says so)."""
    hu, (sz, sy, sx), o = base_volume()
    ny, nx = hu.shape[1:]
    ipps = [(o[0], o[1], o[2] - k * sz) for k in range(len(hu))]
    iop = [1, 0, 0, 0, 1, 0]
    if mirror in ("stored", "anatomy"):
        hu = hu[:, :, ::-1]
        if mirror == "stored":
            iop = [-1, 0, 0, 0, 1, 0]
            ipps = [(o[0] + (nx - 1) * sx, o[1], z) for _, _, z in ipps]
    elif mirror == "rows":
        hu, iop = hu[:, ::-1], [1, 0, 0, 0, -1, 0]
        ipps = [(o[0], o[1] + (ny - 1) * sy, z) for _, _, z in ipps]
    return write_series(folder, hu, iop, ipps, (sy, sx), **kw)


def sagittal(folder: Path, every: int = 2) -> Path:
    """A sagittal reformat: one slice per ``every`` columns (patient right to left), rows from head to
    feet, columns anterior to posterior; slice spacing ``every`` times the base's column spacing."""
    hu, (sz, sy, sx), o = base_volume()
    cols = np.arange(0, hu.shape[2], every)
    images = np.stack([hu[:, :, j] for j in cols])  # (x, z, y)
    ipps = [(o[0] + j * sx, o[1], o[2]) for j in cols]
    return write_series(folder, images, [0, 1, 0, 0, 0, -1], ipps, (sz, sy))


def coronal(folder: Path, every: int = 2) -> Path:
    """A coronal reformat: one slice per ``every`` rows (anterior to posterior), rows from head to feet."""
    hu, (sz, sy, sx), o = base_volume()
    rows = np.arange(0, hu.shape[1], every)
    images = np.stack([hu[:, i, :] for i in rows])  # (y, z, x)
    ipps = [(o[0], o[1] + i * sy, o[2]) for i in rows]
    return write_series(folder, images, [1, 0, 0, 0, 0, -1], ipps, (sz, sx))


def oblique(folder: Path, degrees: float) -> Path:
    """The axial series with its planes rotated ``degrees`` about the patient's left-right axis (the
    header only: enough for the orientation check)."""
    hu, (sz, sy, sx), o = base_volume()
    a = np.radians(degrees)
    col = [0, np.cos(a), np.sin(a)]
    normal = np.cross([1, 0, 0], col)
    ipps = [o - k * sz * normal for k in range(len(hu))]
    return write_series(folder, hu, [1, 0, 0, *col], ipps, (sy, sx))


def read_tags(path: Path) -> Dataset:
    return pydicom.dcmread(next(path.glob("*.dcm")), stop_before_pixels=True)
