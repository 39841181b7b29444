"""NIfTI volumes, reoriented to canonical slice order.

The header is checked before any voxel is read: the volume's size against :class:`ReadLimits`,
the bytes a ``.nii`` holds against the bytes its header declares, and the decompressed size of a
``.nii.gz`` against ``max_compression_ratio`` times the file's size. The voxels are then read
once in their stored type and scaled straight into the float32 HU array (no float64 copy, no
second reoriented copy).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from msnet.errors import LimitError, MsnetError
from msnet.io.volume import CTVolume, floor_out_of_field, read_limits

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_COMPLETE_FIX = "check that the file is a complete .nii/.nii.gz"


def read_nifti(path: Path, sid: str) -> CTVolume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        dtype = img.header.get_data_dtype()
    except Exception as exc:
        raise MsnetError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path, _COMPLETE_FIX) from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MsnetError(f"NIfTI has {len(shape)} dimensions, expected 3", path, "pass a 3-D CT volume")
    if np.dtype(dtype).kind not in "iuf":
        raise MsnetError(f"NIfTI voxels of type {np.dtype(dtype)} are not CT values", path, "pass a 3-D CT volume")
    ornt = nib.orientations.io_orientation(img.affine)
    canon_shape = [0, 0, 0]
    for axis, (out_axis, _) in enumerate(ornt):
        canon_shape[int(out_axis)] = shape[axis]
    nx, ny, nz = canon_shape
    _check_size(path, img, (ny, nx, nz), np.dtype(dtype))
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") \
            else np.asanyarray(img.dataobj)
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
    except Exception as exc:
        raise MsnetError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path, _COMPLETE_FIX) from exc
    if raw.ndim == 4:
        raw = raw[..., 0]
    # RAS: x to the right, y to anterior, z to superior. Slices superior first; rows anterior
    # to posterior, columns patient right to left (the DICOM display convention).
    canon = nib.orientations.apply_orientation(raw, ornt)
    hu = np.empty((nz, ny, nx), np.float32)
    view = canon.transpose(2, 1, 0)[::-1, ::-1, ::-1]
    with np.errstate(over="ignore", invalid="ignore"):
        if slope != 1.0:
            np.multiply(view, np.float32(slope), out=hu, casting="unsafe")
        else:
            hu[...] = view
        if inter != 0.0:
            hu += np.float32(inter)
    del raw, canon, view
    floor_out_of_field(hu)
    notes = []
    lin = img.affine[:3, :3]
    if np.count_nonzero(np.abs(lin) > 1e-6 * np.abs(lin).max()) > 3:
        notes.append("oblique NIfTI affine: reoriented to the closest axial orientation")
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    zx, zy, zz = (float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    k = np.arange(nz)[::-1]
    z = affine[2, 2] * k + affine[2, 3]
    return CTVolume(hu=hu, spacing_mm=(zz, zy, zx), z_mm=z.astype(float), study_id=sid, source=str(path),
                    kind="hu", warnings=notes, transfer_syntax=None, n_series=1, series_uid=None)


def _check_size(path: Path, img, rows_cols_slices: tuple[int, int, int], dtype: np.dtype) -> None:
    """Limits and bytes present, from the header alone (before any voxel is read)."""
    limits = read_limits()
    rows, cols, n_slices = rows_cols_slices
    limits.check_shape(rows, cols, n_slices, path)
    need = rows * cols * n_slices * dtype.itemsize
    try:
        offset = int(img.header["vox_offset"])
    except (KeyError, ValueError, TypeError):
        offset = 0
    size = os.path.getsize(path)
    if path.name.lower().endswith(".gz"):
        if need > limits.max_compression_ratio * max(size, 1):
            raise LimitError(f"{size} compressed bytes would expand to {need} bytes of voxels (ratio "
                             f"{need / max(size, 1):.0f}, limit {limits.max_compression_ratio:g}): refused as "
                             "implausible for CT (a possible decompression bomb or a falsified header)", path,
                             "save the volume uncompressed (.nii), or raise MSNET_MAX_COMPRESSION_RATIO")
    elif size < offset + need:
        raise MsnetError(f"truncated: the header declares {need} bytes of voxels from byte {offset}, the file "
                         f"holds {size} bytes", path, _COMPLETE_FIX)


def mask_slices(path: Path) -> np.ndarray:
    """Per slice, whether a NIfTI label mask marks any voxel: a bool array in canonical order (superior
    first), reoriented exactly as :func:`read_nifti` reorients the study the mask belongs to."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise MsnetError(f"cannot read NIfTI mask ({type(exc).__name__}: {exc})", path, _COMPLETE_FIX) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MsnetError(f"NIfTI mask has {data.ndim} dimensions, expected 3", path, "pass the study's 3-D mask")
    canon = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(img.affine))
    return (canon != 0).any(axis=(0, 1))[::-1].copy()  # RAS z runs to the head: reversed, superior first
