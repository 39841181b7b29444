"""The lung gate: segmentation on real chest CT, refusal of volumes without lungs, the lung crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from conftest import CAP002, COVID_CT_MD, DICOM_ZOO, NORMAL001, P001, UCSD

from msnet import lungs as L
from msnet import preprocess as P
from msnet.errors import MsnetError
from msnet.io import CTVolume, read_study

ABDOMEN_NII = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
SCANS = {"P001": (P001, 0), "cap002": (CAP002, 55), "normal001": (NORMAL001, None)}  # row of the slice labels


@pytest.fixture(scope="module")
def scans(shared_data) -> dict[str, CTVolume]:
    return {name: read_study(folder) for name, (folder, _) in SCANS.items()}


def _volume(hu: np.ndarray, spacing_mm=(5.0, 3.0, 3.0), study_id="phantom") -> CTVolume:
    n = hu.shape[0]
    return CTVolume(hu.astype(np.float32), tuple(spacing_mm), -np.arange(n) * spacing_mm[0], study_id, "memory")


def _grid(n: int, size: int, sz: float, ps: float):
    z = np.arange(n, dtype=np.float32)[:, None, None] * sz
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * ps
    return z, c[None, :, None], c[None, None, :]  # z (down), y (anterior -> posterior), x


def _abdomen(n=48, size=128, sz=5.0, ps=3.0, seed=0) -> np.ndarray:
    """Abdomen without lungs: fat, muscle, liver, kidneys, spine, a stomach with an air-fluid level
    (about 0.4 l of gas) and small gas-filled bowel loops."""
    rng = np.random.default_rng(seed)
    z, y, x = _grid(n, size, sz, ps)
    r = np.sqrt((x / 165.0) ** 2 + (y / 115.0) ** 2) + 0 * z
    hu = np.where(r < 1.0, np.where(r > 0.9, -100.0, 40.0), -1000.0)
    hu = np.where(((x + 55) / 75) ** 2 + ((y + 5) / 65) ** 2 + ((z - 40) / 110) ** 2 < 1, 60.0, hu)  # liver
    for side in (-1, 1):
        hu = np.where(((x - side * 65) / 28) ** 2 + ((y - 40) / 35) ** 2 + ((z - 120) / 55) ** 2 < 1, 30.0, hu)
    hu = np.where((x / 20) ** 2 + ((y - 75) / 20) ** 2 < 1, 450.0, hu)  # vertebral bodies
    stomach = ((x - 60) / 60) ** 2 + ((y + 30) / 45) ** 2 + ((z - 45) / 50) ** 2 < 1
    hu = np.where(stomach, np.where(y < -25, -1000.0, 15.0), hu)  # gas above the fluid level
    for _ in range(30):  # bowel loops below the stomach
        cx, cy, cz = rng.uniform(-110, 110), rng.uniform(-80, 40), rng.uniform(110, 230)
        rr = rng.uniform(8, 16)
        hu = np.where(((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) < rr ** 2, -1000.0, hu)
    return (hu + rng.normal(0.0, 15.0, hu.shape)).astype(np.float32)


def _water_cylinder(n=40, size=128, sz=5.0, ps=3.0) -> np.ndarray:
    z, y, x = _grid(n, size, sz, ps)
    hu = np.where(x ** 2 + y ** 2 + 0 * z < 100.0 ** 2, 0.0, -1000.0)
    return (hu + np.random.default_rng(1).normal(0.0, 10.0, hu.shape)).astype(np.float32)


# --------------------------------------------------------------------------- real chest CT


@pytest.mark.parametrize("name", list(SCANS))
def test_real_chest_ct_has_adult_lungs_inside_the_scan(scans, name):
    vol = scans[name]
    stats = P.check_lungs(vol)
    assert 2500.0 <= stats.volume_ml <= 8000.0  # an adult's lungs at inspiration
    assert 0 < stats.first_slice < stats.last_slice <= vol.n_slices - 1
    assert 200.0 <= stats.height_mm <= 330.0  # apex to base
    assert stats.z_mm == (vol.z_mm[stats.first_slice], vol.z_mm[stats.last_slice])
    assert stats.warnings == [] and not (stats.cut_top or stats.cut_bottom)  # whole lungs scanned
    # the top slices show the trachea only: airway is not lung
    assert stats.slice_area_mm2[0] == 0.0 and (vol.hu[0] < -900).sum() > 0
    # every slice that the dataset labels as infected lies in the lung range
    row = SCANS[name][1]
    if row is not None:
        labels = np.load(COVID_CT_MD / "Slice-level-labels-updated-1.npy")[row, : vol.n_slices]
        infected = np.flatnonzero(labels)
        assert stats.first_slice <= infected.min() and infected.max() <= stats.last_slice


def test_lung_crop_keeps_the_lungs_and_drops_the_rest(scans):
    vol = scans["P001"]
    stats = P.lung_stats(vol.hu, vol.spacing_mm)
    crop = P.lung_crop(vol.hu, stats)
    n, h, w = crop.shape
    area = vol.hu.shape[1] * vol.hu.shape[2]
    assert n == vol.n_slices and h == w and h * w < 0.9 * area  # square: wide lungs keep most of the width
    assert np.prod(P.lung_crop(vol.hu[:1], stats, square=False).shape) < 0.6 * area
    mid = (stats.first_slice + stats.last_slice) // 2
    inside = ndi.binary_fill_holes(vol.hu[mid] > -500)  # the body outline, holes (lungs) filled
    lung_hu = inside & (vol.hu[mid] > -950) & (vol.hu[mid] < -600)
    r0, _, c0, _ = P.lung_box(stats, vol.hu.shape)
    kept = lung_hu[max(0, r0):r0 + h, max(0, c0):c0 + w]
    assert lung_hu.sum() > 20000 and kept.sum() >= 0.99 * lung_hu.sum()
    # a full-resolution mask gives the same crop
    mask = np.zeros(vol.hu.shape[1:], bool)
    r0, r1, c0, c1 = stats.box
    mask[r0:r1, c0:c1] = True
    assert np.array_equal(P.lung_crop(vol.hu[:2], mask), crop[:2])


def test_partial_scan_passes_with_a_warning(scans):
    vol = scans["P001"]
    middle = CTVolume(vol.hu[50:110], vol.spacing_mm, vol.z_mm[50:110], "P001-middle", vol.source)
    stats = P.check_lungs(middle)
    assert stats.cut_top and stats.cut_bottom
    assert len(stats.warnings) == 1 and "only part of the lungs" in stats.warnings[0]
    assert stats.volume_ml < P.check_lungs(vol).volume_ml


# --------------------------------------------------------------------------- grey images (no HU)


def _box_iou(a, b) -> float:
    r0, r1 = max(a[0], b[0]), min(a[1], b[1])
    c0, c1 = max(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = lambda x: (x[1] - x[0]) * (x[3] - x[2])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("name", list(SCANS))
def test_grey_lung_mask_of_a_lung_window_picture_finds_the_hu_lungs(scans, name):
    """The 2-D mask of a real slice drawn as an 8-bit lung-window picture (what a figure of a paper is)
    against the HU lung segmentation of the same slice: the same region, and the same crop box."""
    vol = scans[name]
    stats = P.lung_stats(vol.hu, vol.spacing_mm)
    for k in (0.35, 0.5, 0.7):  # upper, middle, lower lung
        z = int(stats.first_slice + k * (stats.last_slice - stats.first_slice))
        hu = vol.hu[z]
        picture = np.round(P.window(hu, *P.LUNG) * 255.0) / 255.0
        mask = P.grey_lung_mask(picture)
        body = ndi.binary_fill_holes(hu > -500)
        lungs = body & (hu < -400)
        lungs = ndi.binary_opening(lungs, iterations=3)
        inter = (mask & lungs).sum()
        assert inter >= 0.9 * lungs.sum(), (name, k)  # the lungs are inside the mask
        assert mask.sum() <= 1.6 * lungs.sum(), (name, k)  # and the mask is not the whole body
        box = P.lung_box(mask, mask.shape, margin=0.0, square=False)
        assert _box_iou(box, P.lung_box(lungs, lungs.shape, margin=0.0, square=False)) > 0.85, (name, k)


def test_grey_lung_mask_of_real_ucsd_pictures(shared_data):
    """Figures of papers (already cut to the body): the mask covers the dark lung fields, not the body
    wall, and the crop keeps them."""
    from PIL import Image

    from msnet.data.slices import load_image_slice

    files = sorted((UCSD / "train" / "CT_COVID").iterdir())[::24] + sorted((UCSD / "train" / "CT_NonCOVID").iterdir())[::24]
    plausible = 0
    for f in files:
        grey = np.asarray(Image.open(f).convert("L"))
        mask = P.grey_lung_mask(grey / 255.0)
        plausible += 0.2 <= mask.mean() <= 0.8 and grey[mask].mean() < grey[~mask].mean() - 20
        crop = P.grey_lung_crop(grey[None])[0]
        r0, r1, c0, c1 = P.lung_box(mask, mask.shape, margin=0.0, square=False)
        assert crop.shape[0] >= r1 - r0 and crop.shape[1] >= c1 - c0  # the whole mask is kept
        assert crop.shape[0] <= grey.shape[0] and crop.shape[1] <= grey.shape[1]
        one = load_image_slice(f, 64, lung_crop=True)
        assert one.shape == (1, 64, 64) and one.dtype == torch.uint8
    assert plausible >= 0.9 * len(files)


def test_grey_lung_masks_are_remembered_and_mirrored(shared_data, monkeypatch):
    """A picture seen again, or its mirror image, gets the mask made the first time (mirrored), without a
    second segmentation; that mask is the one a segmentation of the mirror image gives."""
    from PIL import Image

    files = sorted((UCSD / "train" / "CT_COVID").iterdir())[5::40] + sorted((UCSD / "val" / "CT_NonCOVID").iterdir())[5::40]
    pictures = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    made = []
    segment = L._grey_lung_mask
    monkeypatch.setattr(L, "_grey_lung_mask", lambda u: made.append(u.shape) or segment(u))
    monkeypatch.setattr(L, "_MASKS", type(L._MASKS)())
    monkeypatch.setattr(L, "_masks_held", 0)
    first = [P.grey_lung_mask(u) for u in pictures]
    assert len(made) == len(pictures)
    again = [P.grey_lung_mask(u) for u in pictures]
    mirrored = [P.grey_lung_mask(np.ascontiguousarray(u[:, ::-1])) for u in pictures]
    assert len(made) == len(pictures)  # nothing segmented twice
    for u, a, b, m in zip(pictures, first, again, mirrored):
        assert a.any() and np.array_equal(a, b)
        assert np.array_equal(m, a[:, ::-1]) and np.array_equal(m, segment(np.ascontiguousarray(u[:, ::-1])))
    monkeypatch.setattr(L, "_MASKS_BYTES", 1)
    P.grey_lung_mask(pictures[0] * 0.5)  # a new picture, over the memory allowed: the older masks are forgotten
    assert len(L._MASKS) == 1 and len(made) == len(pictures) + 1


@pytest.mark.parametrize("picture", [np.full((96, 96), 128, np.uint8),
                                     np.where(np.hypot(*np.mgrid[-48:48, -48:48]) < 40, 200, 10).astype(np.uint8),
                                     np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))],
                         ids=["flat", "body-without-lungs", "ramp"])
def test_grey_pictures_without_lungs_stay_uncropped(picture):
    assert not P.grey_lung_mask(picture / 255.0)[20:76, 20:76].all()
    assert P.grey_lung_crop(picture[None]).shape == (1, 96, 96)


def test_model_slices_crops_grey_volumes_when_asked():
    grey = np.full((2, 80, 80), 200, np.uint8)
    grey[:, 20:60, 10:35] = 20
    grey[:, 20:60, 45:70] = 20  # two dark lungs in a bright body on a bright background
    vol = CTVolume(grey.astype(np.float32), (1.0, 1.0, 1.0), np.zeros(2), "png", "x", kind="grey")
    assert P.model_slices(vol, P.PreprocessSpec(kind="grey")).shape == (2, 80, 80)
    r0, r1, c0, c1 = 20, 60, 10, 70
    got = P.model_slices(vol, P.PreprocessSpec(kind="grey", lung_crop=True)).shape
    assert got[0] == 2 and abs(got[1] - (r1 - r0)) <= 6 and abs(got[2] - (c1 - c0)) <= 6


# --------------------------------------------------------------------------- no lungs: refused


def test_abdomen_nifti_is_refused(shared_data):
    vol = read_study(ABDOMEN_NII)
    with pytest.raises(MsnetError) as exc:
        P.check_lungs(vol)
    text = str(exc.value)
    assert "example_ct" in text and "no diagnosis" in text and "Fix: pass a chest CT" in text


def test_abdomen_phantom_with_bowel_gas_is_refused():
    hu = _abdomen()
    gas_ml = float((hu < -900).sum()) * 5.0 * 3.0 * 3.0 / 1000.0
    assert gas_ml > P.MIN_LUNG_ML  # enough gas to pass for lungs by volume alone
    stats = P.lung_stats(hu, (5.0, 3.0, 3.0))
    assert stats.volume_ml < 0.25 * P.MIN_LUNG_ML
    with pytest.raises(MsnetError, match="abdomen-phantom"):
        P.check_lungs(_volume(hu, study_id="abdomen-phantom"))


@pytest.mark.parametrize("hu", [_water_cylinder(), np.full((10, 64, 64), -1000.0, np.float32)],
                         ids=["water-cylinder", "air"])
def test_volume_without_lungs_is_refused(hu):
    stats = P.lung_stats(hu, (5.0, 3.0, 3.0))
    assert not stats.found and stats.volume_ml == 0.0 and stats.box is None
    with pytest.raises(MsnetError, match="no lungs found"):
        P.check_lungs(_volume(hu, study_id="cylinder"))


def test_grey_images_are_not_gated():
    vol = CTVolume(np.zeros((1, 32, 32), np.float32), (1.0, 1.0, 1.0), np.zeros(1), "png", "x", kind="grey")
    assert P.check_lungs(vol) is None


def test_inspect_reports_lungs_and_the_gate(shared_data):
    from typer.testing import CliRunner

    from msnet.cli import app

    res = CliRunner().invoke(app, ["inspect", str(ABDOMEN_NII), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["lung_gate"] == "refused" and info["lung_volume_ml"] < P.MIN_LUNG_ML
    assert any("no diagnosis" in w for w in info["warnings"])
    res = CliRunner().invoke(app, ["inspect", str(NORMAL001)])
    assert res.exit_code == 0 and "lung volume" in res.output and "lung z-range" in res.output


# --------------------------------------------------------------------------- msnet's own phantoms


def test_synthetic_chest_phantoms_pass_the_gate(tmp_path):
    from msnet.data.synthetic import synth_cohort

    synth_cohort(tmp_path, 6, size=64, seed=11, slices=(8, 12))
    for study in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        vol = read_study(study)
        stats = P.check_lungs(vol)
        assert 1000.0 <= stats.volume_ml <= 8000.0 and stats.warnings == [], (study.name, stats.to_dict())
        assert 0 <= stats.first_slice < stats.last_slice <= vol.n_slices - 1


def test_crop_box_is_square_and_padded_with_air_at_the_edge():
    hu = np.zeros((3, 20, 30), np.float32)
    mask = np.zeros((20, 30), bool)
    mask[2:18, 0:6] = True  # lungs at the left edge, taller than wide
    crop = P.lung_crop(hu, mask, margin=0.0)
    assert crop.shape == (3, 16, 16)
    assert np.all(crop[:, :, :5] == -1000.0) and np.all(crop[:, :, 5:] == 0.0)  # 10 columns padded, 5 left, 5 right
    assert P.lung_crop(hu, mask, margin=0.0, square=False).shape == (3, 16, 6)
    assert P.lung_crop(hu, np.zeros((20, 30), bool)) is hu  # no lungs: nothing to crop to


# --------------------------------------------------------------------------- the gate's coarse grid


@pytest.mark.parametrize("case", ["P001", "cap002", "normal001", "P001-lower", "abdomen-nifti", "abdomen-phantom",
                                  "water-cylinder"])
def test_coarse_grid_gives_the_fine_grids_verdict(scans, case, shared_data):
    """The gate runs on a grid of 6 mm (a quarter of the blocks): the same verdict as on the 3 mm grid, on the
    real scans and on the volumes it refuses, and about the same lung volume where there are lungs."""
    from msnet import gates as G
    from msnet.lungs import GATE_GRID_MM, GRID_MM

    if case in scans:
        vol = scans[case]
    elif case == "P001-lower":
        v = scans["P001"]
        vol = CTVolume(v.hu[74:], v.spacing_mm, v.z_mm[74:], case, v.source)
    elif case == "abdomen-nifti":
        vol = read_study(ABDOMEN_NII)
    else:
        vol = _volume(_abdomen() if case == "abdomen-phantom" else _water_cylinder(), study_id=case)
    coarse = G._gate_stats(vol, GATE_GRID_MM, 5.0)
    fine = G._gate_stats(vol, GRID_MM, 2.5)
    assert G._refused(coarse) == G._refused(fine)
    if not G._refused(fine):
        assert coarse.volume_ml == pytest.approx(fine.volume_ml, rel=0.05)
        assert G.gate_stats(vol).grid_mm[1] == GATE_GRID_MM  # the coarse verdict stands: no second pass
