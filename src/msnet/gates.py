"""The gates before any diagnosis: is this a chest CT, with lungs in it, of the kind the model takes?

:func:`check_lungs` refuses an HU volume that is not a plausible chest CT: too little lung
(:func:`msnet.lungs.lung_stats`), or a failed check of :func:`chest_checks` (body outline, two lungs
either side of the midline, airway, HU histogram, lung fraction of the body, slice spacing, field of
view). :func:`check_input_kind` holds a study's kind (HU volume or grey-level images) against the
kind a model was trained on. Made with scipy; grey-level images (no HU) are not gated by the checks.

The gate works on the coarse grid of :data:`msnet.lungs.GATE_GRID_MM`; a refusal, or a lung volume
near its threshold, is checked again on the fine grid before it stands.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from msnet.errors import MsnetError
from msnet.lungs import (GATE_GRID_MM, GATE_GRID_Z_MM, GRID_MM, GRID_Z_MM, MIN_LUNG_ML, LungStats,
                         body_mask, lung_stats)

SPACING_MM = (0.3, 120.0)
"""Plausible slice spacing (mm): thin-slice chest CT to a handful of slices over the chest (sparse key
images; msnet's own phantoms of 4-16 slices are 20-110 mm apart)."""
FOV_MM = (120.0, 700.0)
"""Plausible in-plane field of view (mm) along each axis: a child's chest to the largest bore."""
BODY_CM2 = (100.0, 2500.0)
"""Plausible median cross-section of the body (cm^2) over the slices with lungs."""
BODY_EDGE_MAX = 0.5
"""The body (not the table, not the air) touches at most this fraction of the image's border."""
SIDE_MIN = 0.15
"""Each side of the body's midline holds at least this fraction of the lung voxels (two lungs, not one blob)."""
AIRWAY_MM2 = (40.0, 700.0)
"""Cross-section of a trachea or main bronchus lumen (mm^2), below -950 HU, inside the body and central."""
AIRWAY_CENTRAL = 0.15
"""An airway lies within this fraction of the body's width from the body's midline."""
AIRWAY_MIN_SLICES = 2
"""An airway is seen in at least this many of the slices searched (when the scan shows the lung apices).
Reported, but alone it refuses nothing: msnet's synthetic phantoms have no trachea."""
ADVISORY = ("airway",)
"""Checks that are reported (``msnet inspect``) but do not refuse a study by themselves."""
FAT_MIN, SOFT_MIN, BONE_MIN, AIR_OUTSIDE_MIN = 0.005, 0.05, 0.002, 0.5
"""Least fractions of the body's voxels that are fat (-150..-50 HU), soft tissue (-20..100 HU) and bone
(> 250 HU), and of the voxels around the body that are air (< -900 HU)."""
LUNG_FRACTION = (0.04, 0.85)
"""Plausible lung volume / body volume over the slices with lungs."""


def _check(name: str, value, expected: str, ok: bool | None, detail: str = "") -> dict:
    return {"name": name, "value": value, "expected": expected, "ok": None if ok is None else bool(ok),
            "refuses": name not in ADVISORY, **({"detail": detail} if detail else {})}


def _sample(hu: np.ndarray, stats: LungStats, body: np.ndarray, step: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution HU of the grid's slices, every ``step``-th pixel (block means blur fat and bone away),
    and whether each lies in the body."""
    fz, fy, fx = stats.step
    z0 = min(fz // 2, hu.shape[0] - 1)
    h, w = body.shape[1] * fy, body.shape[2] * fx
    vals = np.asarray(hu[z0::fz, :h:step, :w:step][: body.shape[0]], dtype=np.float32)
    inside = body[:, np.arange(0, h, step) // fy][:, :, np.arange(0, w, step) // fx]
    return vals, inside


def _airway_slices(hu: np.ndarray, stats: LungStats, body: np.ndarray, spacing_mm: Sequence[float]) -> tuple[int, int]:
    """(slices with a central air lumen of airway size, slices searched): the full-resolution slices of the
    grid from 2 cm above the lungs to their upper third, every other pixel."""
    from scipy import ndimage as ndi

    from msnet.lungs import _PLANE

    fz, fy, fx = stats.step
    z0 = min(fz // 2, hu.shape[0] - 1)
    sz = float(spacing_mm[0]) if float(spacing_mm[0]) > 0 else 1.0
    lo = stats.first_slice - int(round(20.0 / sz))
    hi = stats.first_slice + max(1, (stats.last_slice - stats.first_slice) // 3)
    picks = [g for g in range(body.shape[0]) if lo <= z0 + g * fz <= hi and body[g].any()]
    if not picks:
        return 0, 0
    h, w = body.shape[1] * fy, body.shape[2] * fx
    sl = np.asarray(hu[[z0 + g * fz for g in picks], :h:2, :w:2])
    bb = body[picks][:, np.arange(0, h, 2) // fy][:, :, np.arange(0, w, 2) // fx]
    lab, n = ndi.label((sl < -950) & bb, structure=_PLANE)  # one label per slice component
    if n == 0:
        return 0, len(picks)
    idx = np.flatnonzero(lab)
    flat = lab.ravel()[idx]
    area = np.bincount(flat, minlength=n + 1)[1:] * 4.0 * float(spacing_mm[1]) * float(spacing_mm[2])
    col = np.bincount(flat, weights=(idx % sl.shape[2]).astype(np.float64), minlength=n + 1)[1:]
    zi = np.bincount(flat, weights=(idx // (sl.shape[1] * sl.shape[2])).astype(np.float64), minlength=n + 1)[1:]
    cx = col / np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    zi = np.rint(zi / np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)).astype(int)
    cols = bb.sum(axis=1)  # (slices, W)
    mid = (cols @ np.arange(bb.shape[2])) / np.maximum(cols.sum(axis=1), 1)
    width = (cols > 0).sum(axis=1)
    ok = (area >= AIRWAY_MM2[0]) & (area <= AIRWAY_MM2[1]) & (np.abs(cx - mid[zi]) <= AIRWAY_CENTRAL * width[zi])
    return int(np.unique(zi[ok]).size), len(picks)


def chest_checks(hu: np.ndarray, stats: LungStats, spacing_mm: Sequence[float]) -> list[dict]:
    """Is this HU volume a chest CT? One dict per check: name, value, expected, ok (None: not applicable),
    refuses (False: reported only, :data:`ADVISORY`).

    Made on ``stats``' grid (:func:`msnet.lungs.lung_stats`) and, for the HU histogram and the airway,
    on full-resolution pixels of its slices. ``hu`` is (l, H, W) in canonical order.

    >>> hu = np.full((6, 64, 64), -1000.0, np.float32); hu[:, 8:56, 8:56] = 40.0
    >>> [c["name"] for c in chest_checks(hu, lung_stats(hu, (5.0, 5.0, 5.0)), (5.0, 5.0, 5.0)) if c["ok"] is False]
    ['two lungs', 'hu histogram', 'lung fraction']
    """
    sz, sy, sx = (float(s) for s in spacing_mm)
    n, h, w = hu.shape
    x = stats.grid
    body = stats.body if stats.body is not None else body_mask(x)
    fz, fy, fx = stats.step
    checks = []
    fov = (round(h * sy, 1), round(w * sx, 1))
    checks.append(_check("slice spacing", round(sz, 3), f"{SPACING_MM[0]}-{SPACING_MM[1]} mm",
                         SPACING_MM[0] <= sz <= SPACING_MM[1] or n == 1))
    checks.append(_check("field of view", list(fov), f"{FOV_MM[0]:.0f}-{FOV_MM[1]:.0f} mm each way",
                         all(FOV_MM[0] <= f <= FOV_MM[1] for f in fov)))
    # body outline: a body of a chest's size, surrounded by air (not filling the picture)
    rows = np.flatnonzero(stats.mask.any(axis=(1, 2))) if stats.found else np.flatnonzero(body.any(axis=(1, 2)))
    sel = body[rows] if rows.size else body
    area_cm2 = float(np.median(sel.sum(axis=(1, 2)))) * fy * sy * fx * sx / 100.0 if sel.size else 0.0
    edge = np.concatenate([sel[:, 0, :], sel[:, -1, :], sel[:, :, 0], sel[:, :, -1]], axis=1)
    edge_frac = float(np.median(edge.mean(axis=1))) if sel.size else 0.0
    checks.append(_check("body outline", {"cross_section_cm2": round(area_cm2), "border_fraction": round(edge_frac, 3)},
                         f"{BODY_CM2[0]:.0f}-{BODY_CM2[1]:.0f} cm^2, touching at most {BODY_EDGE_MAX:.0%} of the border",
                         BODY_CM2[0] <= area_cm2 <= BODY_CM2[1] and edge_frac <= BODY_EDGE_MAX))
    # two lungs, either side of the body's midline
    if stats.found:
        m, b = stats.mask[rows], body[rows]
        cols = np.arange(b.shape[2])
        mid = (b.sum(axis=1) @ cols) / np.maximum(b.sum(axis=(1, 2)), 1)
        left = float((m.sum(axis=1) * (cols[None] < mid[:, None])).sum())
        side = min(left, float(m.sum()) - left) / max(float(m.sum()), 1.0)
        lung_frac = float(m.sum()) / max(float(b.sum()), 1.0)
    else:
        side = lung_frac = 0.0
    checks.append(_check("two lungs", round(side, 3), f"each side of the midline holds >= {SIDE_MIN:.0%} of the lung",
                         side >= SIDE_MIN))
    # airway: a central air lumen above and in the upper lungs (when the scan shows the apices)
    if stats.found and not stats.cut_top:
        seen, searched = _airway_slices(hu, stats, body, spacing_mm)
        checks.append(_check("airway", seen, f">= {AIRWAY_MIN_SLICES} slices with a central air lumen of "
                             f"{AIRWAY_MM2[0]:.0f}-{AIRWAY_MM2[1]:.0f} mm^2 (of {searched} searched)",
                             seen >= min(AIRWAY_MIN_SLICES, searched)))
    else:
        checks.append(_check("airway", None, "searched when the scan shows the lung apices", None))
    # HU histogram: air around the body, fat, soft tissue and bone in it
    vals, inside = _sample(hu, stats, body)
    inner, outer = vals[inside], vals[~inside]
    frac = {"fat": float(((inner >= -150) & (inner <= -50)).mean()) if inner.size else 0.0,
            "soft_tissue": float(((inner >= -20) & (inner <= 100)).mean()) if inner.size else 0.0,
            "bone": float((inner > 250).mean()) if inner.size else 0.0,
            "air_outside": float((outer < -900).mean()) if outer.size else 1.0}
    peaks = _peaks(vals)
    least = {"fat": FAT_MIN, "soft_tissue": SOFT_MIN, "bone": BONE_MIN, "air_outside": AIR_OUTSIDE_MIN}
    low = [k for k in least if frac[k] < least[k]]
    checks.append(_check("hu histogram", {**{k: round(v, 4) for k, v in frac.items()}, "peaks_hu": peaks},
                         ", ".join(f"{k} >= {v:.1%}" for k, v in least.items()), not low,
                         f"too little {', '.join(low)}" if low else ""))
    checks.append(_check("lung fraction", round(lung_frac, 3), f"{LUNG_FRACTION[0]}-{LUNG_FRACTION[1]} of the body "
                         "over the slices with lungs", LUNG_FRACTION[0] <= lung_frac <= LUNG_FRACTION[1]))
    return checks


def _peaks(vals: np.ndarray) -> list[int]:
    """The HU of the histogram's main peaks (-1100..1100 HU, 10 HU bins, smoothed), highest first."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    edges = np.arange(-1100.0, 1101.0, 10.0)
    v = vals[(vals >= -1100.0) & (vals < 1100.0)]
    hist = np.bincount(((v + 1100.0) * 0.1).astype(np.int64), minlength=220)[:220]
    if hist.sum() == 0:
        return []
    sm = gaussian_filter1d(np.log1p(hist.astype(np.float64)), 1.5)
    idx, props = find_peaks(sm, prominence=0.5)
    order = idx[np.argsort(-props["prominences"])][:5]
    return [int(round(edges[i] + 5.0)) for i in order]


def _plain(value) -> str:
    """A check's value as words: ``{"a": 1, "b": [2, 3]}`` -> ``a 1, b [2, 3]``."""
    return ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def failed(checks: list[dict]) -> list[dict]:
    """The checks that failed and refuse a study."""
    return [c for c in checks if c["ok"] is False and c.get("refuses", True)]


def _gate_stats(vol, grid_mm: float, grid_z_mm: float) -> LungStats:
    stats = lung_stats(vol.hu, vol.spacing_mm, getattr(vol, "z_mm", None), grid_mm=grid_mm, grid_z_mm=grid_z_mm)
    stats.checks = chest_checks(vol.hu, stats, vol.spacing_mm)
    return stats


def _refused(stats: LungStats) -> bool:
    return not stats.found or stats.volume_ml < MIN_LUNG_ML or bool(failed(stats.checks))


def gate_stats(vol, coarse: bool = True) -> LungStats:
    """The lung stats and chest checks of an HU volume, with no verdict: on the gate's coarse grid (a
    refusal there, or a lung volume within 50% of :data:`MIN_LUNG_ML`, made again on the fine grid), or
    on the fine grid (``coarse=False``)."""
    if coarse:
        stats = _gate_stats(vol, GATE_GRID_MM, GATE_GRID_Z_MM)
        if not _refused(stats) and stats.volume_ml >= 1.5 * MIN_LUNG_ML:
            return stats
    return _gate_stats(vol, GRID_MM, GRID_Z_MM)


def check_lungs(vol, stats: LungStats | None = None, coarse: bool = True) -> LungStats | None:
    """The lung gate for a :class:`msnet.io.CTVolume`: stats, or MsnetError when it shows no (or too little)
    lung, or is not a chest CT by :func:`chest_checks`.

    Grey-level image volumes (kind ``grey``: screenshots, no HU) are not gated: None. When the scan
    cuts the lungs (apices or bases missing), ``stats.warnings`` says so; the caller passes it on.
    ``stats``: this volume's :func:`gate_stats` (or :func:`msnet.lungs.lung_stats`), when already computed;
    ``coarse``: see :func:`gate_stats`.

    e.g. stats = check_lungs(vol)
    e.g. prediction_warnings += stats.warnings if stats else []
    """
    if getattr(vol, "kind", "hu") != "hu":
        return None
    if stats is None:
        stats = gate_stats(vol, coarse)
    elif not stats.checks:
        stats.checks = chest_checks(vol.hu, stats, vol.spacing_mm)
    stats.warnings = []
    sid = vol.study_id
    fix = ("pass a chest CT series that covers the lungs (a lung or mediastinal reconstruction, not a scout, "
           "an abdomen or a head scan)")
    if not stats.found:
        raise MsnetError(f"study {sid}: no lungs found (no aerated, lung-like region inside the body), so no "
                         "diagnosis is made", fix=fix)
    if stats.volume_ml < MIN_LUNG_ML:
        raise MsnetError(f"study {sid}: only {stats.volume_ml:.0f} ml of lung found in slices {stats.first_slice}-"
                         f"{stats.last_slice} of {stats.n_slices} (a diagnosis needs at least {MIN_LUNG_ML:.0f} ml; "
                         f"adult lungs hold 3-7 l), so no diagnosis is made", fix=fix)
    bad = failed(stats.checks)
    if bad:
        said = "; ".join(f"{c['name']} {_plain(c['value'])}" + (f", {c['detail']}" if c.get("detail") else "")
                         + f" (expected {c['expected']})" for c in bad)
        raise MsnetError(f"study {sid}: not a plausible chest CT ({said}), so no diagnosis is made",
                         fix=fix + "; `msnet inspect STUDY` lists every check with its value")
    missing = [part for part, cut in (("apices (top)", stats.cut_top), ("bases (bottom)", stats.cut_bottom)) if cut]
    if missing:
        stats.warnings.append(f"the scan covers only part of the lungs: it cuts off the lung {' and '.join(missing)}"
                              f" ({stats.volume_ml:.0f} ml of lung in the scan); the diagnosis sees only that part")
    return stats


KINDS = {"hu": "CT volumes in Hounsfield units (DICOM series, NIfTI, MetaImage)",
         "grey": "2-D grey-level images (PNG/JPEG slices, no Hounsfield units)"}


def check_input_kind(vol, model_kind: str) -> list[str]:
    """A study's kind against the kind a model was trained on: MsnetError when an HU model is given grey-level
    images (no HU: its windows and gates mean nothing there); a warning when a grey-level model is given an
    HU volume. Returns the warnings.

    >>> class V: kind, source = "hu", "scan.nii.gz"
    >>> check_input_kind(V(), "grey")[0][:40]
    'this model was trained on 2-D grey-level'
    """
    kind = getattr(vol, "kind", "hu")
    if kind == model_kind or model_kind not in KINDS:
        return []
    if model_kind == "hu":
        raise MsnetError(f"this model takes {KINDS['hu']}; the study is {KINDS.get(kind, kind)}, so no diagnosis "
                         "is made", getattr(vol, "source", None),
                         "pass the CT series itself (DICOM folder or .zip, .nii/.nii.gz, .mha), not pictures of it")
    return [f"this model was trained on {KINDS['grey']}; the study is {KINDS['hu']}: it sees the HU volume through "
            "one lung window, which is not what it learned on, so take its answer with caution"]
