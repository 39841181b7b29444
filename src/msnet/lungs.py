"""Lung segmentation and crop: the HU lung mask of a volume on a coarse grid, its box, and the rough
2-D lung mask of grey images without HU (figures of papers).

Nothing here touches files or models; the gates that refuse a study (:mod:`msnet.gates`) and the
preprocessing that crops to the lungs (:func:`msnet.preprocess.model_slices`) are built on it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LUNG_HU_MAX = -400.0
"""Aerated lung (and airway) voxels lie below this; soft tissue, fluid and bone above."""
BODY_HU_MIN = -500.0
"""The body is what lies above this, with its holes (lungs, airways, bowel gas) filled, slice by slice."""
GAS_HU = -950.0
"""Below this (after the grid's block averaging) a voxel is plain gas: airway lumen, bowel gas, outside air.
Lung parenchyma averages about -850 HU, vessels and septa included."""
GAS_FRACTION_MAX = 0.5
"""A 3-D air-like region with more plain gas than this is bowel or stomach gas, not lung."""
AIRWAY_MAX_MM2 = 800.0
"""Largest cross-section of trachea or main bronchus (in one slice) that is removed as airway."""
AIRWAY_GAS_FRACTION = 0.2
"""An airway cross-section has a lumen of plain gas: at least this fraction of its area."""
AIRWAY_CENTRAL = 0.15
"""An airway cross-section lies within this fraction of the enclosed air's width from its midline."""
HOLE_MAX_MM2 = 2000.0
"""Holes in the lung mask of one slice (vessels, nodules, enclosed opacities) up to this area are filled;
larger ones (the mediastinum enclosed by touching lungs) are not."""
KEEP_FRACTION = 0.1
"""3-D lung-like regions smaller than this fraction of the largest one are dropped (skin folds, bowel gas)."""
MIN_LUNG_ML = 400.0
"""Fewer millilitres of lung than this: not a chest CT (or only a sliver of lung) and no diagnosis is made.
Adult lungs hold 3-7 l at full inspiration; a quarter of them, scanned alone, still holds more than this."""
PARTIAL_FRACTION = 0.1
"""The scan cuts the lungs when the lung area of its first (last) slice is above this fraction of the
largest lung cross-section: the apices (bases) are missing."""
GRID_MM = 3.0
GRID_Z_MM = 2.5
"""The grid of the lung mask that crops and explanations use: block means of about 3 mm in-plane, a slice
every 2.5 mm."""
GATE_GRID_MM = 6.0
GATE_GRID_Z_MM = 5.0
"""The coarser grid of the gates (:func:`msnet.gates.check_lungs`): a quarter of the in-plane blocks and at most
half the slices, the same verdict (checked on the real scans and the refused cases in tests/test_lungs.py);
a verdict near a threshold is made again on the fine grid."""
BLOCK_SAMPLES = 4
"""A block mean averages at most this many rows and columns of its block (evenly spaced): enough to average
out the noise, and a coarse grid then reads no more pixels than the fine one."""
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1, 1, :] = _PLANE[1, :, 1] = True  # 4-connectivity inside a slice, none across slices


@dataclass
class LungStats:
    """The lungs of a volume: mask (on a coarse grid), z-range, volume and in-plane box.

    ``mask`` is boolean on the coarse grid ``hu[z0::step[0], ::step[1], ::step[2]]`` (block means in-plane);
    ``first_slice``/``last_slice`` are canonical slice indices (inclusive, -1 when no lungs), ``z_mm`` the
    positions of those slices, ``box`` (row0, row1, col0, col1) the lungs' in-plane bounding box in
    pixels of the full slices (end exclusive; ``None`` when no lungs).

    >>> LungStats(np.zeros((1, 1, 1), bool), (1, 1, 1), 0.0, -1, -1, None, None, 1, 0.0).found
    False
    """

    mask: np.ndarray
    step: tuple[int, int, int]
    volume_ml: float
    first_slice: int
    last_slice: int
    z_mm: tuple[float, float] | None
    box: tuple[int, int, int, int] | None
    n_slices: int
    height_mm: float
    cut_top: bool = False
    cut_bottom: bool = False
    slice_area_mm2: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    warnings: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    """The chest-CT checks of :func:`msnet.gates.chest_checks` (name, value, expected, ok), once gated."""
    grid_mm: tuple[float, float] = (GRID_Z_MM, GRID_MM)
    """The (z, in-plane) grid asked for: (:data:`GRID_Z_MM`, :data:`GRID_MM`) or the gates' coarser one."""
    grid: np.ndarray | None = field(default=None, repr=False)
    """The HU block means the mask was made on (the same shape as ``mask``)."""
    body: np.ndarray | None = field(default=None, repr=False)
    """The body on that grid, every slice's holes filled (:func:`_body`)."""
    spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The volume's (z, row, col) spacing."""

    @property
    def found(self) -> bool:
        return self.first_slice >= 0

    @property
    def z_coverage(self) -> float:
        """Fraction of the scan's slices that show lung."""
        return (self.last_slice - self.first_slice + 1) / self.n_slices if self.found and self.n_slices else 0.0

    def to_dict(self) -> dict:
        """JSON-serialisable summary (what ``msnet inspect`` reports)."""
        return {
            "lung_volume_ml": round(float(self.volume_ml), 1),
            "lung_slices": [int(self.first_slice), int(self.last_slice)] if self.found else None,
            "lung_z_mm": [round(float(z), 2) for z in self.z_mm] if self.z_mm is not None else None,
            "lung_height_mm": round(float(self.height_mm), 1),
            "lung_z_coverage": round(float(self.z_coverage), 3),
            "lung_box": [int(b) for b in self.box] if self.box is not None else None,
            "lungs_cut": [side for side, cut in (("top", self.cut_top), ("bottom", self.cut_bottom)) if cut],
        }


def _grid(hu: np.ndarray, spacing_mm: Sequence[float], grid_mm: float = GRID_MM,
          grid_z_mm: float = GRID_Z_MM) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """Coarse grid: every fz-th slice (fz * spacing about ``grid_z_mm``), fy x fx block means in-plane
    (about ``grid_mm``), each of at most :data:`BLOCK_SAMPLES` x :data:`BLOCK_SAMPLES` evenly spaced pixels."""
    sz, sy, sx = (float(s) for s in spacing_mm)
    fz = max(1, int(round(grid_z_mm / sz))) if sz > 0 else 1
    fy = max(1, int(round(grid_mm / sy))) if sy > 0 else 1
    fx = max(1, int(round(grid_mm / sx))) if sx > 0 else 1
    n, h, w = hu.shape
    fy, fx = min(fy, h), min(fx, w)
    z0 = min(fz // 2, n - 1)
    x = np.asarray(hu[z0::fz, : (h // fy) * fy, : (w // fx) * fx], dtype=np.float32)
    if fy > 1 or fx > 1:  # block means as strided sums (4x faster than a reshaped mean)
        ky = range(0, fy, max(1, fy // BLOCK_SAMPLES))
        kx = range(0, fx, max(1, fx // BLOCK_SAMPLES))
        rows = x[:, 0::fy].copy()
        for k in ky[1:]:
            rows += x[:, k::fy]
        x = rows[:, :, 0::fx].copy()
        for k in kx[1:]:
            x += rows[:, :, k::fx]
        x *= np.float32(1.0 / (len(ky) * len(kx)))
    return x, (fz, fy, fx), z0


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """The holes of every slice (not the mask itself): the background regions of a slice (4-connected)
    that do not reach its edge. One labelling pass (``scipy.ndimage.binary_fill_holes`` slice by slice,
    less the mask, gives the same, 2x slower)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(~mask, structure=_PLANE)
    outside = np.zeros(n + 1, dtype=bool)
    outside[0] = True  # the mask itself
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[edge.ravel()] = True
    return ~outside[lab]


def _body(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(body, enclosed air) on a grid of HU block means. The body is the largest 3-D region above
    BODY_HU_MIN with every slice's holes filled in; the enclosed air its holes: in a chest CT the air
    spaces inside the body (lungs, airways), every one of them (below the carina the two lungs are two
    regions), never the air around it."""
    from scipy import ndimage as ndi

    solid = x > BODY_HU_MIN
    holes = _fill_holes_2d(solid)
    body = solid | holes
    lab, n = ndi.label(body)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = lab == int(sizes.argmax())
    return body, holes & body


def body_mask(x: np.ndarray) -> np.ndarray:
    """The body on a grid of HU block means (see :func:`_body`)."""
    return _body(x)[0]


def _remove_airways(cand: np.ndarray, x: np.ndarray, body: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """Drop trachea, main bronchi and oesophageal air: small, central, gas-cored cross-sections."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(cand, structure=_PLANE)  # one label per slice component
    if n == 0:
        return cand
    idx = np.flatnonzero(lab)  # the candidate voxels only (a fraction of the grid)
    flat = lab.ravel()[idx]
    h, w = x.shape[1], x.shape[2]
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    gas = np.bincount(flat, weights=x.ravel()[idx] < GAS_HU, minlength=n + 1)
    safe = np.maximum(area, 1.0)
    col_c = np.bincount(flat, weights=(idx % w).astype(np.float64), minlength=n + 1) / safe
    z_c = np.rint(np.bincount(flat, weights=(idx // (h * w)).astype(np.float64), minlength=n + 1) / safe).astype(int)
    # body midline and width per slice
    b_area = body.sum(axis=(1, 2)).astype(np.float64)
    b_cols = body.sum(axis=1)  # (z, W)
    b_mid = (b_cols * np.arange(x.shape[2])).sum(axis=1) / np.maximum(b_area, 1.0)
    b_width = (b_cols > 0).sum(axis=1).astype(np.float64)
    central = np.abs(col_c - b_mid[z_c]) < AIRWAY_CENTRAL * b_width[z_c]
    airway = (area * pixel_mm2 < AIRWAY_MAX_MM2) & (gas >= AIRWAY_GAS_FRACTION * area) & central
    airway[0] = False
    return cand & ~airway[lab]


def _lung_regions(cand: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Union of the 3-D air-like regions that look like lung (not plain gas, not a sliver)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(cand)
    if n == 0:
        return cand
    idx = np.flatnonzero(lab)  # the candidate voxels only
    flat = lab.ravel()[idx]
    size = np.bincount(flat, minlength=n + 1).astype(np.float64)
    gas = np.bincount(flat, weights=x.ravel()[idx] < GAS_HU, minlength=n + 1)
    lungish = gas <= GAS_FRACTION_MAX * size
    lungish[0] = False
    if not lungish.any():
        return np.zeros_like(cand)
    keep = lungish & (size >= KEEP_FRACTION * size[lungish].max())
    return keep[lab]


def _fill_small_holes(mask: np.ndarray, pixel_mm2: float) -> np.ndarray:
    from scipy import ndimage as ndi

    holes = _fill_holes_2d(mask) & ~mask
    lab, n = ndi.label(holes, structure=_PLANE)
    if n == 0:
        return mask
    small = np.bincount(lab.ravel()[np.flatnonzero(lab)], minlength=n + 1) * pixel_mm2 <= HOLE_MAX_MM2
    small[0] = False
    return mask | small[lab]


def lung_stats(hu: np.ndarray, spacing_mm: Sequence[float], z_mm: Sequence[float] | None = None,
               grid_mm: float = GRID_MM, grid_z_mm: float = GRID_Z_MM) -> LungStats:
    """Segment the lungs of an HU volume (l, H, W) in canonical order; their z-range, volume and box.

    Classical and fast (about 0.1-0.3 s for 150 x 512 x 512 on one core): on a grid of about
    3 x 3 mm in-plane (block means) and 2.5 mm in z, (1) the body is the largest region above
    -500 HU with every slice's holes filled; (2) air-like voxels (< -400 HU) in its holes are
    candidates (outside air never is); (3) small, central cross-sections with a gas lumen
    (trachea, main bronchi, oesophagus) are removed; (4) 3-D regions that are mostly plain gas
    (bowel, stomach) or small beside the largest lung region are dropped; (5) holes up to
    20 cm^2 per slice (vessels, enclosed opacities) are filled. ``spacing_mm`` is (z, row, col);
    ``z_mm`` the slice positions (default: 0, -spacing, ...); ``grid_mm``/``grid_z_mm`` the grid
    (the gates use a coarser one, :data:`GATE_GRID_MM`).

    >>> hu = np.full((4, 8, 8), -1000.0, np.float32)
    >>> lung_stats(hu, (2.0, 1.0, 1.0)).found  # air only: no body, no lungs
    False
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or 0 in hu.shape:
        raise ValueError(f"expected an (l, H, W) volume, got shape {hu.shape}")
    n = hu.shape[0]
    x, step, z0 = _grid(hu, spacing_mm, grid_mm, grid_z_mm)
    fz, fy, fx = step
    sz, sy, sx = (float(s) for s in spacing_mm)
    pixel_mm2 = fy * sy * fx * sx
    voxel_ml = pixel_mm2 * fz * max(sz, 0.0) / 1000.0
    body, enclosed = _body(x)
    mask = (x < LUNG_HU_MAX) & enclosed
    mask = _remove_airways(mask, x, enclosed, pixel_mm2)
    mask = _lung_regions(mask, x)
    mask = _fill_small_holes(mask, pixel_mm2)
    area = mask.sum(axis=(1, 2)) * pixel_mm2
    slice_area = np.repeat(area, fz)[:n] if fz > 1 else area
    if fz > 1 and slice_area.size < n:
        slice_area = np.concatenate([slice_area, np.repeat(area[-1:], n - slice_area.size)])
    z_pos = np.asarray(z_mm, dtype=float) if z_mm is not None else -np.arange(n) * sz
    rows = np.flatnonzero(area > 0)
    extra = {"grid_mm": (float(grid_z_mm), float(grid_mm)), "grid": x, "body": body, "spacing_mm": (sz, sy, sx)}
    if rows.size == 0:
        return LungStats(mask, step, 0.0, -1, -1, None, None, n, 0.0, slice_area_mm2=slice_area.astype(np.float32),
                         **extra)
    first, last = int(rows[0]) * fz, min(n - 1, int(rows[-1]) * fz + fz - 1)
    r = np.flatnonzero(mask.any(axis=(0, 2)))
    c = np.flatnonzero(mask.any(axis=(0, 1)))
    box = (int(r[0]) * fy, int(r[-1] + 1) * fy, int(c[0]) * fx, int(c[-1] + 1) * fx)
    peak = float(area.max())
    stats = LungStats(mask=mask, step=step, volume_ml=float(mask.sum() * voxel_ml), first_slice=first,
                      last_slice=last, z_mm=(float(z_pos[first]), float(z_pos[last])), box=box, n_slices=n,
                      height_mm=(last - first + 1) * max(sz, 0.0),
                      cut_top=bool(area[0] > PARTIAL_FRACTION * peak),
                      cut_bottom=bool(area[-1] > PARTIAL_FRACTION * peak),
                      slice_area_mm2=slice_area.astype(np.float32), **extra)
    return stats


def lung_box(stats_or_mask: LungStats | np.ndarray, shape: Sequence[int], margin: float = 0.05,
             square: bool = True) -> tuple[int, int, int, int] | None:
    """The crop box (row0, row1, col0, col1) around the lungs, widened by ``margin`` of its larger side.

    With ``square`` the shorter side grows to the longer (centred), so that resizing to S x S keeps the
    aspect ratio; the box may then reach past the slice (padding needed). None when there are no lungs.
    """
    h, w = int(shape[-2]), int(shape[-1])
    if isinstance(stats_or_mask, LungStats):
        box = stats_or_mask.box
    else:
        m = np.asarray(stats_or_mask, dtype=bool)
        m = m.reshape(-1, *m.shape[-2:]).any(axis=0)
        r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        box = (int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1) if r.size else None
    if box is None:
        return None
    r0, r1, c0, c1 = box
    r1, c1 = min(r1, h), min(c1, w)
    pad = int(round(margin * max(r1 - r0, c1 - c0)))
    r0, r1, c0, c1 = r0 - pad, r1 + pad, c0 - pad, c1 + pad
    if square:
        side = max(r1 - r0, c1 - c0)
        r0 -= (side - (r1 - r0)) // 2
        c0 -= (side - (c1 - c0)) // 2
        r1, c1 = r0 + side, c0 + side
    else:
        r0, r1, c0, c1 = max(0, r0), min(h, r1), max(0, c0), min(w, c1)
    return r0, r1, c0, c1


def lung_crop(hu: np.ndarray, stats_or_mask: LungStats | np.ndarray, margin: float = 0.05, square: bool = True,
              fill: float = -1000.0) -> np.ndarray:
    """Crop every slice of (l, H, W) to the lungs' in-plane box (one box per volume) before resizing.

    ``stats_or_mask``: the :class:`LungStats` of this volume or a full-resolution mask ((l, H, W) or
    (H, W)). Parts of a square box outside the slice are ``fill`` (air). No lungs: ``hu`` unchanged.

    >>> hu = np.full((2, 10, 10), -1000.0, np.float32)
    >>> mask = np.zeros((10, 10), bool); mask[2:6, 3:5] = True
    >>> lung_crop(hu, mask, margin=0.0).shape
    (2, 4, 4)
    """
    box = lung_box(stats_or_mask, hu.shape, margin=margin, square=square)
    if box is None:
        return hu
    r0, r1, c0, c1 = box
    h, w = hu.shape[-2:]
    if r0 >= 0 and c0 >= 0 and r1 <= h and c1 <= w:
        return hu[..., r0:r1, c0:c1]
    out = np.full((*hu.shape[:-2], r1 - r0, c1 - c0), fill, dtype=hu.dtype)
    sr0, sr1, sc0, sc1 = max(0, r0), min(h, r1), max(0, c0), min(w, c1)
    out[..., sr0 - r0:sr1 - r0, sc0 - c0:sc1 - c0] = hu[..., sr0:sr1, sc0:sc1]
    return out


GREY_LUNG_MIN_FRACTION = 0.1
"""A grey image's lung mask covering less of it than this is not trusted: the image stays uncropped."""


_MASKS: "OrderedDict[bytes, tuple[tuple[int, int], np.ndarray]]" = OrderedDict()
_MASKS_LOCK = threading.Lock()
_MASKS_BYTES = 32 * 2**20
"""How much memory the masks :func:`grey_lung_mask` remembers may take (a bit a pixel: 6 KB at 224 px)."""
_masks_held = 0


def _image_key(unit: np.ndarray) -> bytes:
    a = np.ascontiguousarray(unit, dtype=np.float32)
    h = hashlib.blake2b(np.array(a.shape, dtype=np.int64).tobytes(), digest_size=16)
    h.update(a.tobytes())
    return h.digest()


def grey_lung_mask(unit: np.ndarray) -> np.ndarray:
    """A rough lung mask of one grey CT image without HU (a lung-window slice as an 8-bit picture, such as a
    figure of a paper), values in [0, 1]; False everywhere when nothing is found.

    The last masks made (:data:`_MASKS_BYTES` of them) are remembered by the images' bytes, and the mask
    of a mirrored image is taken to be the mirrored mask (the segmentation treats left and right alike):
    an image seen again (a cross-validation fold, a refit, the mirror pass of test-time augmentation)
    costs a hash, not a segmentation (about 20 ms at 224 px).

    The smoothed image is split at its Otsu threshold. The body is the convex hull of the largest bright
    region; of the dark regions, the two largest that lie at least half inside it (not the air around
    the body or under the table) and are not most of the image are kept, each with its holes filled and
    made convex (lesions at the lung's edge stay inside). It errs towards too much: where the lungs
    merge through the mediastinum the hull covers the heart too.

    >>> img = np.ones((64, 64), np.float32); img[10:54, 8:28] = 0.1; img[10:54, 36:56] = 0.1
    >>> m = grey_lung_mask(img); bool(m[30, 15]), bool(m[30, 45]), bool(m[30, 32])
    (True, True, False)
    """
    unit = np.asarray(unit, dtype=np.float32)
    key = _image_key(unit)
    known = _remembered_mask(key)
    if known is None:  # the mirror image's key is hashed only when the image's own is not known
        known = _remembered_mask(_image_key(unit[:, ::-1]), mirrored=True)
    if known is not None:
        return known
    global _masks_held
    out = _grey_lung_mask(unit)
    with _MASKS_LOCK:
        if key not in _MASKS:
            _MASKS[key] = (out.shape, np.packbits(out))
            _masks_held += _MASKS[key][1].nbytes
        while _masks_held > _MASKS_BYTES and len(_MASKS) > 1:
            _masks_held -= _MASKS.popitem(last=False)[1][1].nbytes
    return out


def _remembered_mask(key: bytes, mirrored: bool = False) -> np.ndarray | None:
    """The mask remembered under ``key`` (mirrored left to right if asked), or None."""
    with _MASKS_LOCK:
        if key not in _MASKS:
            return None
        _MASKS.move_to_end(key)
        shape, bits = _MASKS[key]
    out = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
    return np.ascontiguousarray(out[:, ::-1]) if mirrored else out


def _grey_lung_mask(unit: np.ndarray) -> np.ndarray:
    """:func:`grey_lung_mask`, made anew."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import convex_hull_image

    h, w = unit.shape
    g = ndi.gaussian_filter(np.asarray(unit, dtype=np.float32), max(1.0, 0.005 * max(h, w)))
    out = np.zeros((h, w), dtype=bool)
    if float(g.max() - g.min()) < 1e-3:
        return out
    t = threshold_otsu(g)
    bright, n_bright = ndi.label(g >= t)
    if n_bright == 0:
        return out
    body = convex_hull_image(bright == 1 + int(np.argmax(ndi.sum(g >= t, bright, range(1, n_bright + 1)))))
    dark = ndi.binary_opening(g < t, iterations=2)
    lab, n = ndi.label(dark)
    sizes = ndi.sum(dark, lab, range(1, n + 1)) if n else np.zeros(0)
    inside = ndi.sum(body, lab, range(1, n + 1)) / np.maximum(sizes, 1) if n else np.zeros(0)
    kept = 0
    for i in np.argsort(sizes)[::-1][:4]:
        if sizes[i] < 0.02 * h * w or kept == 2:
            break
        if inside[i] < 0.5 or sizes[i] > 0.6 * h * w:
            continue  # the air around the body (outside its hull), or one region that is most of the image
        out |= convex_hull_image(ndi.binary_fill_holes(lab == i + 1))
        kept += 1
    return out


def grey_lung_crop(grey: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Grey slices (l, H, W), 0..255, cropped to the box of their 2-D lung masks (:func:`grey_lung_mask`,
    one box per volume, widened by ``margin``, kept inside the image); unchanged where the masks cover
    less than :data:`GREY_LUNG_MIN_FRACTION` of a slice."""
    masks = np.stack([grey_lung_mask(np.asarray(sl, dtype=np.float32) / 255.0) for sl in grey])
    if masks.any(axis=0).mean() < GREY_LUNG_MIN_FRACTION:
        return grey
    r0, r1, c0, c1 = lung_box(masks, grey.shape, margin=margin, square=False)
    return grey[..., r0:r1, c0:c1]
