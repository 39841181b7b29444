"""MetaImage volumes (``.mha``, ``.mhd`` + raw), as STOIC2021 ships its scans, read through SimpleITK.

The header is read first and checked against :class:`ReadLimits`; the volume is then reoriented to
the canonical orientation (``DICOMOrient`` to LPS: columns to the patient's left, rows to posterior,
slices to the head, then the slice axis reversed: superior first). The voxels are taken as HU
(MetaImage has no rescale); out-of-field values become air.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msnet.errors import MsnetError
from msnet.io.volume import CTVolume, floor_out_of_field, read_limits

METAIMAGE_SUFFIXES = (".mha", ".mhd")
_FIX = "check that the file is a complete MetaImage (.mha, or .mhd with its .raw)"


def read_metaimage(path: Path, sid: str) -> CTVolume:
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # optional at import time: only this reader needs it
        raise MsnetError("reading MetaImage needs SimpleITK", path, "pip install SimpleITK") from exc
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, n_comp = reader.GetSize(), reader.GetNumberOfComponents()
    except Exception as exc:  # noqa: BLE001 - any ITK failure is a bad file
        raise MsnetError(f"cannot read MetaImage ({type(exc).__name__}: {exc})", path, _FIX) from exc
    if len(size) != 3 or n_comp != 1:
        raise MsnetError(f"MetaImage of size {size} with {n_comp} components, expected one 3-D volume", path,
                         "pass a 3-D CT volume")
    read_limits().check_shape(int(size[1]), int(size[0]), int(size[2]), path)
    try:
        img = sitk.DICOMOrient(reader.Execute(), "LPS")
    except Exception as exc:  # noqa: BLE001
        raise MsnetError(f"cannot read MetaImage ({type(exc).__name__}: {exc})", path, _FIX) from exc
    arr = sitk.GetArrayViewFromImage(img)  # (slices to the head, rows to posterior, columns to the left)
    if arr.dtype.kind not in "iuf":
        raise MsnetError(f"MetaImage voxels of type {arr.dtype} are not CT values", path, "pass a 3-D CT volume")
    hu = np.ascontiguousarray(arr[::-1], dtype=np.float32)
    floor_out_of_field(hu)
    sx, sy, sz = (float(s) for s in img.GetSpacing())
    notes = []
    if not np.allclose(np.abs(np.asarray(img.GetDirection()).reshape(3, 3)), np.eye(3), atol=1e-3):
        notes.append("oblique MetaImage direction: reoriented to the closest axial orientation")
    z0 = float(img.GetOrigin()[2])
    z = z0 + sz * np.arange(hu.shape[0])[::-1]
    return CTVolume(hu=hu, spacing_mm=(sz, sy, sx), z_mm=z.astype(float), study_id=sid, source=str(path),
                    kind="hu", warnings=notes, transfer_syntax=None, n_series=1, series_uid=None)
