"""NIfTI volumes, reoriented to canonical slice order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msnet.errors import MsnetError
from msnet.io.volume import AIR_HU, OUT_OF_FIELD_HU, CTVolume, check_range

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_nifti(path: Path, sid: str) -> CTVolume:
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
    check_range(vol)
    return vol


