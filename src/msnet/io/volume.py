"""The study as the rest of msnet sees it: :class:`CTVolume` (HU slices in canonical order), its sanity
checks (:func:`check_volume`) and the size limits every reader applies before allocating (:class:`ReadLimits`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msnet.errors import LimitError, MsnetError

AIR_HU = -1000.0
OUT_OF_FIELD_HU = -1124.0  # anything below -1024 HU minus a 100 HU margin is not tissue
PLAUSIBLE_MAX_HU = 4000.0  # above: warned (metal reaches it; a wrong slope or signedness too)
MAX_POSSIBLE_HU = 65535.0  # above: refused, no CT scale (16-bit extended included) reaches it
ALL_AIR_HU = -900.0  # a maximum below this: every voxel is air, refused
NO_AIR_WARN_HU = -200.0  # a minimum above this: no air in the volume, warned
NO_AIR_REFUSE_HU = 500.0  # a minimum above this: no air, fat or soft tissue at all, refused
NEAR_CONSTANT_HU = 20.0  # the middle 99 % of voxels within this many HU: refused as blank
NEAR_CONSTANT_GREY = 2.0  # the same for images, in grey levels

# Read limits (see ReadLimits): checked on the headers, before any pixel buffer is allocated.
MAX_SLICE_PIXELS = 2048 * 2048  # Rows x Columns of one slice
MAX_VOXELS = 1 << 28  # a whole study: 512 x 512 x 1024 slices, 1 GiB as float32 HU
MAX_COMPRESSION_RATIO = 200.0  # decoded / stored bytes of a .nii.gz (a CT compresses about 2-4:1)


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
    sop_instance_uids: list[str] | None = None
    """DICOM only: the SOPInstanceUID of each slice, in canonical order (kept in sync with ``hu``)."""
    dicom_headers: Any = field(default=None, repr=False, compare=False)
    """DICOM only: the header (no pixel data) of the first slice in canonical order, for writing results
    into the source study. It holds patient identifiers: never print or log it."""

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


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ReadLimits:
    """The largest study the readers accept, checked on the headers before a pixel buffer is allocated.

    Defaults are the module constants; each can be changed with an environment variable
    (``LIMIT_ENV``) or for the whole process with :func:`set_read_limits` (``msnet serve`` does
    so from its flags).

    >>> ReadLimits().max_voxels == MAX_VOXELS
    True
    """

    max_slice_pixels: int = MAX_SLICE_PIXELS
    max_voxels: int = MAX_VOXELS
    max_compression_ratio: float = MAX_COMPRESSION_RATIO

    def check_shape(self, rows: int, cols: int, n_slices: int, path) -> None:
        """LimitError when a slice or the volume is larger than allowed."""
        if rows * cols > self.max_slice_pixels:
            raise LimitError(f"slices of {rows} x {cols} pixels are over the limit of {self.max_slice_pixels} "
                             "pixels per slice", path, f"raise {LIMIT_ENV['max_slice_pixels']} (or --max-slice-pixels) "
                             "if such slices are expected; otherwise the header is wrong")
        if rows * cols * n_slices > self.max_voxels:
            raise LimitError(f"{n_slices} slices of {rows} x {cols} pixels ({rows * cols * n_slices} voxels) are over "
                             f"the limit of {self.max_voxels} voxels", path,
                             f"raise {LIMIT_ENV['max_voxels']} (or --max-voxels), or pass fewer slices")


LIMIT_ENV = {"max_slice_pixels": "MSNET_MAX_SLICE_PIXELS", "max_voxels": "MSNET_MAX_VOXELS",
             "max_compression_ratio": "MSNET_MAX_COMPRESSION_RATIO"}
_LIMITS: ReadLimits | None = None


def set_read_limits(limits: ReadLimits | None) -> None:
    """Use ``limits`` for every read in this process (None: back to the environment and the defaults)."""
    global _LIMITS
    _LIMITS = limits


def read_limits() -> ReadLimits:
    """The limits in force: those set with :func:`set_read_limits`, else the environment, else the defaults."""
    if _LIMITS is not None:
        return _LIMITS
    values = {}
    for name, var in LIMIT_ENV.items():
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            value = float(text) if name == "max_compression_ratio" else int(float(text))
        except ValueError:
            value = 0
        if value <= 0:
            raise MsnetError(f"{var}={text!r} is not a positive number", fix=f"set {var} to a positive number or unset it")
        values[name] = value
    return ReadLimits(**values)


# --------------------------------------------------------------------------- sanity


def floor_out_of_field(hu: np.ndarray) -> np.ndarray:
    """Set values below ``OUT_OF_FIELD_HU`` to air, in place; NaN and infinite values are left for
    :func:`check_volume` to refuse (an infinite value is not a padding value)."""
    lo = float(hu.min()) if hu.size else 0.0
    if lo < OUT_OF_FIELD_HU:  # False when a NaN is present: the volume is refused anyway
        below = hu < OUT_OF_FIELD_HU
        if lo == -np.inf:
            below &= np.isfinite(hu)
        hu[below] = AIR_HU
    return hu


def _sample(values: np.ndarray, n: int = 1 << 21) -> np.ndarray:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // n)]


def check_volume(vol: CTVolume) -> CTVolume:
    """Refuse a volume nobody should diagnose; warn on one that is odd. Returns ``vol``.

    Refused (MsnetError naming the study and the fix): NaN or infinite voxels or geometry; a constant or
    near-constant volume (the middle 99 % of voxels within ``NEAR_CONSTANT_HU``; e.g. RescaleSlope
    0); HU that cannot be CT (every voxel air, nothing below ``NO_AIR_REFUSE_HU``, or values above
    ``MAX_POSSIBLE_HU``). Warned: a maximum above ``PLAUSIBLE_MAX_HU``, a volume without air.
    Images (``kind`` "grey") are checked for NaN and for a constant value only.

    >>> hu = np.zeros((2, 4, 4), np.float32); hu[0, 0, 0] = np.nan
    >>> try:
    ...     check_volume(CTVolume(hu, (1.0, 1.0, 1.0), np.array([1.0, 0.0]), "s", "x"))
    ... except MsnetError as exc:
    ...     print(exc.problem)
    1 of 32 voxels are NaN or infinite (slices 0)
    """
    hu, where = vol.hu, vol.source
    if hu.size == 0:
        raise MsnetError("the study holds no voxels", where, "pass a study with at least one slice")
    lo, hi = float(hu.min()), float(hu.max())  # NaN and infinities show in the extremes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(hu)
        bad = int(hu.size - np.count_nonzero(finite))
        slices = np.flatnonzero(~finite.reshape(hu.shape[0], -1).all(axis=1))
        shown = ", ".join(str(int(s)) for s in slices[:10]) + (" ..." if slices.size > 10 else "")
        raise MsnetError(f"{bad} of {hu.size} voxels are NaN or infinite (slices {shown})", where,
                         "re-export the volume from the scanner or archive; NaN/infinite values "
                         "are never diagnosed")
    geometry = [*vol.spacing_mm, *np.asarray(vol.z_mm, float).ravel()]
    if not np.isfinite(geometry).all():
        raise MsnetError(f"slice geometry holds NaN or infinite values (spacing_mm {tuple(vol.spacing_mm)})", where,
                         "check PixelSpacing/ImagePositionPatient (DICOM) or pixdim/the affine (NIfTI)")
    if min(vol.spacing_mm) <= 0:
        vol.warnings.append(f"spacing_mm {tuple(round(float(s), 4) for s in vol.spacing_mm)} is not positive: "
                            "check PixelSpacing/SliceThickness (DICOM) or pixdim (NIfTI)")
    sample = _sample(hu)
    lo_q, hi_q = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    grey = vol.kind != "hu"
    unit = "grey levels" if grey else "HU"
    if hi - lo < 1e-3:
        raise MsnetError(f"every voxel has the same value ({lo:g} {unit})", where,
                         "check RescaleSlope (it must not be 0) or re-export the study; a blank volume "
                         "is never diagnosed")
    if hi_q - lo_q < (NEAR_CONSTANT_GREY if grey else NEAR_CONSTANT_HU):
        raise MsnetError(f"near-constant volume: 99% of voxels lie within {lo_q:g}..{hi_q:g} {unit}", where,
                         "check RescaleSlope/RescaleIntercept or re-export the study; a blank volume "
                         "is never diagnosed")
    if grey:
        return vol
    fix = "check RescaleSlope/RescaleIntercept (and PixelRepresentation) of the files, or the NIfTI scaling"
    if hi > MAX_POSSIBLE_HU:
        raise MsnetError(f"HU maximum {hi:.4g} is beyond any CT scale (above {MAX_POSSIBLE_HU:.0f})", where, fix)
    if hi < ALL_AIR_HU:
        raise MsnetError(f"every voxel is air or below (maximum {hi:.0f} HU): not a CT of a body in HU", where, fix)
    if lo > NO_AIR_REFUSE_HU:
        raise MsnetError(f"no voxel below {lo:.0f} HU (no air, no fat, no soft tissue): not a CT in HU", where, fix)
    if hi > PLAUSIBLE_MAX_HU:
        vol.warnings.append(f"HU maximum {hi:.0f} is above {PLAUSIBLE_MAX_HU:.0f}: {fix}")
    if lo > NO_AIR_WARN_HU:
        vol.warnings.append(f"no air in the volume (lowest value {lo:.0f} HU): a chest CT holds air; {fix}, "
                            "or whether the volume was cropped")
    return vol


def rescale_hint(vol: CTVolume) -> str | None:
    """Advice naming RescaleIntercept when an HU volume holds no air (its lowest value above
    ``NO_AIR_WARN_HU``): CT stores air near 0 and needs RescaleIntercept -1024 to reach -1000 HU, so a
    file without it reads as a body with no air and no lungs. None when the volume has air.

    >>> rescale_hint(CTVolume(np.array([[[0.0, 1200.0]]]), (1, 1, 1), np.zeros(1), "s", "x")).split(":")[0]
    'the lowest value is 0 HU, so air is not at -1000 HU'
    """
    if vol.kind != "hu" or not vol.hu.size:
        return None
    lo = float(np.nanmin(_sample(vol.hu)))
    if not lo > NO_AIR_WARN_HU:
        return None
    return (f"the lowest value is {lo:.0f} HU, so air is not at -1000 HU: the pixels were not rescaled to HU. "
            "Check RescaleIntercept (0028,1052): a CT that stores air near 0 needs RescaleIntercept -1024 "
            "(e.g. `dcmodify -m RescaleIntercept=-1024`), a NIfTI its scl_inter")


def check_range(vol: CTVolume) -> None:
    """Kept for callers of the old name: :func:`check_volume`."""
    check_volume(vol)
