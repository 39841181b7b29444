"""The study as the rest of msnet sees it: :class:`CTVolume` (HU slices in canonical order) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

AIR_HU = -1000.0
OUT_OF_FIELD_HU = -1124.0  # anything below -1024 HU minus a 100 HU margin is not tissue
PLAUSIBLE_MAX_HU = 4000.0


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


def check_range(vol: CTVolume) -> None:
    hi = float(vol.hu.max()) if vol.hu.size else 0.0
    if hi > PLAUSIBLE_MAX_HU:
        vol.warnings.append(f"HU maximum {hi:.0f} is above {PLAUSIBLE_MAX_HU:.0f}: check RescaleSlope/"
                            "Intercept and PixelRepresentation (signedness) of the files")
