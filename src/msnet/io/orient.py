"""Any DICOM orientation to the canonical one: slices axial, superior first; rows anterior to posterior;
columns from the patient's right to the patient's left (patient left on image right), as NIfTI and
MetaImage volumes already are.

A series whose three axes each lie within :data:`MAX_OBLIQUE_DEG` of a patient axis (axial, sagittal,
coronal, stored mirrored or upside down) is permuted and flipped, no voxel interpolated; when the
slice axis changed (a sagittal or coronal series) and the new slices' pixels are not square, the
coarser in-plane axis is resampled (linear) to the finer spacing. A series tilted further (oblique
planes, or slice positions that progress off the slice normal: gantry tilt) is refused; a single
image is read as stored (with a warning when it is oblique or not axial).

A sagittal series (slices to the patient's right, rows to the feet, columns to posterior):

>>> canonical_axes(np.array([-1.0, 0, 0]), np.array([0, 0, -1.0]), np.array([0, 1.0, 0]))[:2]
((1, 2, 0), (False, False, True))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msnet.errors import MsnetError

MAX_OBLIQUE_DEG = 10.0
"""The largest angle between an axis of the series and the patient axis it is taken for; a plane
tilted more, or slice positions that progress further off the slice normal (gantry tilt), is refused."""
SQUARE_TOLERANCE = 0.02
"""In-plane spacings that differ by more than this fraction are resampled to square pixels (after a
sagittal or coronal series is permuted to axial)."""
_TARGET = {2: (0, -1.0), 1: (1, 1.0), 0: (2, 1.0)}  # LPS component -> (canonical axis, direction wanted)
_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


def canonical_axes(slice_dir: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], float]:
    """For an array of axes (slice, row, column) running along ``slice_dir``, ``row_dir`` (the direction
    of increasing row index: IOP's column cosines) and ``col_dir`` (IOP's row cosines), in LPS: the
    array axis to take for each canonical axis, whether to flip each canonical axis, and the largest
    angle (degrees) between an array axis and its patient axis. ValueError when two axes point the same
    way (a broken header)."""
    dirs = [np.asarray(d, float) / (np.linalg.norm(d) or 1.0) for d in (slice_dir, row_dir, col_dir)]
    order = [0, 0, 0]
    flips = [False, False, False]
    taken: set[int] = set()
    worst = 0.0
    for axis, d in enumerate(dirs):
        comp = int(np.argmax(np.abs(d)))
        if comp in taken:
            raise ValueError("two axes of the series point the same way")
        taken.add(comp)
        target, want = _TARGET[comp]
        order[target] = axis
        flips[target] = bool(np.sign(d[comp]) != want)
        worst = max(worst, float(np.degrees(np.arccos(min(1.0, abs(d[comp]))))))
    return tuple(order), tuple(flips), worst


def to_canonical(hu: np.ndarray, spacing: tuple[float, float, float], z_mm: np.ndarray, first_ipp: np.ndarray | None,
                 slice_dir: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, tilt_deg: float,
                 source: Path | str, max_voxels: int) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, list[str], bool]:
    """(hu, spacing, z_mm) of a series sorted along its slice normal -> the same in canonical orientation,
    with notes and whether the slice axis changed (its slices are then no longer the series' instances).

    ``hu`` is returned unchanged (the very array) when the series is already canonical; otherwise a new
    array (never a view of ``hu``: a consumer that read ``hu`` as it was decoded must see that it changed).
    MsnetError for a plane or a gantry tilted beyond :data:`MAX_OBLIQUE_DEG`."""
    try:
        order, flips, angle = canonical_axes(slice_dir, row_dir, col_dir)
    except ValueError as exc:
        raise MsnetError(f"ImageOrientationPatient is not a valid orientation ({exc})", source,
                         "re-export the series; its header is damaged") from exc
    plane = _NAMES[int(np.argmax(np.abs(slice_dir)))]
    if angle > MAX_OBLIQUE_DEG and hu.shape[0] > 1:  # one image has no stack to mis-build: warned below
        raise MsnetError(f"oblique {plane} series: its planes are tilted {angle:.1f} degrees from the patient axes "
                         f"(at most {MAX_OBLIQUE_DEG:g} are taken)", source,
                         "pass an axial reconstruction of the scan (or resample the series to axial first)")
    if tilt_deg > MAX_OBLIQUE_DEG:
        raise MsnetError(f"gantry tilt of {tilt_deg:.1f} degrees: slice positions progress off the slice normal "
                         f"(at most {MAX_OBLIQUE_DEG:g} are taken)", source,
                         "pass a reconstruction without gantry tilt (or resample the series to axial first)")
    notes = []
    if angle > MAX_OBLIQUE_DEG:
        notes.append(f"oblique image: {angle:.1f} degrees from the patient axes, taken as {plane} "
                     "(a series tilted as much is refused)")
    elif angle > 1.0:
        notes.append(f"oblique slices: {angle:.1f} degrees from the patient axes, taken as {plane}")
    if tilt_deg > 0.5:
        notes.append(f"gantry tilt: slice positions progress {tilt_deg:.1f} degrees off the slice normal")
    if hu.shape[0] == 1:  # one image: no slice axis to rebuild, read as stored
        if plane != "axial":
            notes.append(f"a single {plane} image: read as stored")
        return hu, spacing, z_mm, notes, False
    if order == (0, 1, 2) and not any(flips):
        return hu, spacing, z_mm, notes, False
    out = np.transpose(hu, order)
    out = out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    new_spacing = tuple(float(spacing[a]) for a in order)
    slice_changed = order[0] != 0
    if slice_changed:
        n = out.shape[0]
        src = np.arange(n)[::-1] if flips[0] else np.arange(n)
        step_z = float(spacing[order[0]]) * float(([slice_dir, row_dir, col_dir][order[0]])[2]) / (
            np.linalg.norm([slice_dir, row_dir, col_dir][order[0]]) or 1.0)
        z0 = float(first_ipp[2]) if first_ipp is not None else 0.0
        z = z0 + src * step_z
        notes.append(f"{plane} series: reoriented to axial ({n} slices of {new_spacing[0]:.2f} mm)")
        out, new_spacing, resampled = _square_pixels(out, new_spacing, source, max_voxels)
        if resampled:
            notes.append(resampled)
    else:
        z = np.asarray(z_mm, float)[::-1].copy() if flips[0] else np.asarray(z_mm, float)
        what = [name for name, f in zip(("slices", "rows", "columns"), flips) if f]
        notes.append(f"stored mirrored ({', '.join(what)} reversed, as ImageOrientationPatient says): "
                     "flipped to the canonical orientation")
    return np.ascontiguousarray(out, dtype=np.float32), new_spacing, np.asarray(z, float), notes, slice_changed


def _square_pixels(hu: np.ndarray, spacing: tuple[float, float, float], source, max_voxels: int):
    """In-plane axes resampled (linear) to the finer of their two spacings when they differ by more than
    :data:`SQUARE_TOLERANCE`."""
    sz, sy, sx = spacing
    if abs(sy - sx) <= SQUARE_TOLERANCE * min(sy, sx):
        return hu, spacing, None
    from scipy.ndimage import zoom

    fine = min(sy, sx)
    factors = (1.0, sy / fine, sx / fine)  # first and last samples kept where they are (IPP is their centre)
    shape = tuple(n if f == 1.0 else max(1, int(round((n - 1) * f)) + 1) for n, f in zip(hu.shape, factors))
    if shape[0] * shape[1] * shape[2] > max_voxels:
        raise MsnetError(f"resampling the reformatted series to square pixels would give {shape} voxels, over the "
                         f"limit of {max_voxels}", source, "pass an axial reconstruction of the scan")
    out = zoom(hu, [s / n for s, n in zip(shape, hu.shape)], order=3, mode="nearest", grid_mode=False)
    return out.astype(np.float32, copy=False), (sz, fine, fine), \
        f"pixels of {sy:.2f} x {sx:.2f} mm resampled to {fine:.2f} mm squares ({shape[1]} x {shape[2]})"
