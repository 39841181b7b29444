"""The chest-CT gate and the input-kind contract: real chest CT (whole and partial) passes every check,
non-chest volumes and pictures are refused, on the shared scans and on the odd inputs a careful user tries
(a cat photo as PNG and as a NIfTI in CT's HU range); a property test over the gates (hypothesis)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DICOM_ZOO, NORMAL001, P001
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msnet import gates as G
from msnet.errors import MsnetError
from msnet.io import CTVolume, read_study

ABDOMEN_NII = DICOM_ZOO / "totalsegmentator-example" / "example_ct.nii.gz"
UPPER_ABDOMEN = DICOM_ZOO / "totalsegmentator-example" / "example_ct_dicom"


def _cat() -> np.ndarray:
    from skimage import color, data

    g = color.rgb2gray(data.chelsea())  # a photo of a cat, 300 x 451
    return (g - g.min()) / np.ptp(g)


def _cat_hu(lo: float = -983.0, hi: float = 54.0) -> np.ndarray:
    return (lo + (hi - lo) * _cat()).astype(np.float32)


@pytest.fixture(scope="module")
def scans(shared_data) -> dict[str, CTVolume]:
    return {"P001": read_study(P001), "normal001": read_study(NORMAL001)}


def _crop(vol: CTVolume, a: int, b: int, name: str) -> CTVolume:
    return CTVolume(vol.hu[a:b], vol.spacing_mm, vol.z_mm[a:b], name, vol.source)


def _verdict(vol: CTVolume, coarse: bool = True) -> tuple[bool, G.LungStats]:
    stats = G.gate_stats(vol, coarse)
    try:
        G.check_lungs(vol, stats)
        return True, stats
    except MsnetError:
        return False, stats


# --------------------------------------------------------------------------- real chest CT passes


def test_real_chest_ct_whole_and_partial_passes_every_check(scans):
    """No false refusal: the whole scans, their upper and lower halves and a middle slab (no apices, no
    bases, no trachea) pass; every check that applies is ok, with the value it was judged on."""
    for name, vol in scans.items():
        n = vol.n_slices
        for part in (vol, _crop(vol, 0, n // 2, "upper"), _crop(vol, n // 2, n, "lower"),
                     _crop(vol, n // 3, n // 3 + 40, "slab")):
            ok, stats = _verdict(part)
            assert ok, (name, part.study_id, G.failed(stats.checks))
            by = {c["name"]: c for c in stats.checks}
            assert set(by) == {"slice spacing", "field of view", "body outline", "two lungs", "airway",
                               "hu histogram", "lung fraction"}
            assert by["two lungs"]["value"] >= 0.3  # the two lungs, not one of them
            h = by["hu histogram"]["value"]
            assert h["fat"] > 0.05 and h["soft_tissue"] > 0.1 and h["bone"] > 0.01 and h["air_outside"] > 0.5
            assert any(-1050 <= p <= -950 for p in h["peaks_hu"]), h  # the air around the patient
            if part is vol:  # the whole scan shows the apices: the trachea is found above them
                assert by["airway"]["ok"] is True and by["airway"]["value"] >= 5
            json.dumps(stats.checks)  # what inspect prints


def test_a_lower_half_keeps_both_lungs(scans):
    """Below the carina the two lungs are two regions: both are lung (the mask once kept only the larger)."""
    vol = scans["P001"]
    lower = _crop(vol, vol.n_slices // 2, vol.n_slices, "lower")
    whole = G.gate_stats(vol, coarse=False)
    half = G.gate_stats(lower, coarse=False)
    below = whole.slice_area_mm2[vol.n_slices // 2:].sum() * vol.spacing_mm[0] / 1000.0
    assert half.volume_ml == pytest.approx(below, rel=0.1)


# --------------------------------------------------------------------------- what is not a chest CT is refused


def test_cat_as_nifti_in_hu_range_is_refused(tmp_path, shared_data):
    """The table's case: a photo as 40 slices in -983..54 HU once passed the lung gate as 526 ml of lung."""
    import nibabel as nib

    path = tmp_path / "cat.nii.gz"
    nib.save(nib.Nifti1Image(np.repeat(_cat_hu()[None], 40, 0).transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0])),
             path)
    vol = read_study(path)
    stats = G.gate_stats(vol)
    assert stats.volume_ml >= G.MIN_LUNG_ML  # enough dark "lung" to pass on volume alone
    with pytest.raises(MsnetError, match="not a plausible chest CT") as exc:
        G.check_lungs(vol, stats)
    assert "hu histogram" in str(exc.value) and "body outline" in str(exc.value)
    from typer.testing import CliRunner

    from msnet.cli import app

    res = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["lung_gate"] == "refused"
    failed = {c["name"] for c in info["checks"] if c["ok"] is False}
    assert {"hu histogram", "body outline"} <= failed
    bone = next(c for c in info["checks"] if c["name"] == "hu histogram")["value"]["bone"]
    assert bone == 0.0  # nothing above 54 HU: no bone


@pytest.mark.parametrize("path", [ABDOMEN_NII, UPPER_ABDOMEN], ids=["abdomen-nifti", "upper-abdomen-dicom"])
def test_shared_non_chest_scans_are_refused(path, shared_data):
    vol = read_study(path)
    ok, stats = _verdict(vol)
    assert not ok and stats.volume_ml < G.MIN_LUNG_ML
    assert _verdict(vol, coarse=False)[0] is False


def test_scan_without_its_intercept_is_refused(scans):
    vol = scans["normal001"]
    shifted = CTVolume(vol.hu + 1024.0, vol.spacing_mm, vol.z_mm, "no-intercept", vol.source)
    assert _verdict(shifted)[0] is False


# --------------------------------------------------------------------------- the input kind is the bundle's contract


def _bundle(folder: Path, kind: str, ood=None, pretrained: bool = False) -> Path:
    """A complete bundle (64 px; random weights, or the backbone's ImageNet weights) that takes ``kind``
    input (``ood``: its OOD description)."""
    import tempfile

    import torch

    from msnet.config import versions
    from msnet.inference import bundle as B
    from msnet.models import aggregators, backbones
    from msnet.preprocess import PreprocessSpec

    torch.manual_seed(0)
    bb = backbones.create("efficientnet_lite0", pretrained=pretrained)
    agg = aggregators.create("msnet", bb.num_features, n_classes=3).eval()
    spec = PreprocessSpec(kind=kind, size=64)
    classes = ["COVID-19", "CAP", "NORMAL"]
    with tempfile.TemporaryDirectory() as tmp:
        B.save_backbone(Path(tmp) / B.BACKBONE, bb, spec, classes)
        B.save_aggregator(Path(tmp) / B.AGGREGATOR, agg, "msnet", classes, spec)
        card = B.model_card(spec, classes, backbone={"name": "efficientnet_lite0"}, aggregator={"name": "msnet"},
                            training_data={"cohort": ""}, metrics={}, versions=versions(), name=f"test-{kind}")
        return B.write_bundle(folder, Path(tmp) / B.BACKBONE, Path(tmp) / B.AGGREGATOR, card, ood=ood)


@pytest.fixture(scope="module")
def hu_bundle(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("hu") / "bundle", "hu")


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("cat") / "cat.png"
    Image.fromarray((_cat() * 255).astype(np.uint8)).save(path)
    return path


def test_hu_bundle_refuses_a_png_on_the_cli(hu_bundle, cat_png):
    from typer.testing import CliRunner

    from msnet.cli import app

    res = CliRunner().invoke(app, ["predict", str(hu_bundle), str(cat_png), "--json"])
    assert res.exit_code != 0
    err = json.loads(res.output.strip().splitlines()[-1])
    assert err["status"] == "failed" and "takes CT volumes in Hounsfield units" in err["error"]
    assert "2-D grey-level images" in err["error"]


def test_hu_bundle_refuses_a_png_over_http_with_422(hu_bundle, cat_png):
    from fastapi.testclient import TestClient

    from msnet.inference.predictor import Predictor
    from msnet.service.app import create_app

    with TestClient(create_app(None, predictor=Predictor(hu_bundle, device="cpu", mirror=False))) as c:
        assert "Hounsfield" in c.get("/health").json()["takes"]
        r = c.post("/v1/predict", files={"file": ("cat.png", cat_png.read_bytes(), "image/png")})
    assert r.status_code == 422, r.text
    assert "takes CT volumes in Hounsfield units" in r.json()["detail"]


def test_grey_bundle_warns_on_a_ct_volume(tmp_path):
    from msnet.data.synthetic import synth_cohort
    from msnet.inference.predictor import Predictor

    synth_cohort(tmp_path / "data", 1, size=64, seed=2, slices=(8, 10))
    study = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    result = Predictor(_bundle(tmp_path / "bundle", "grey"), device="cpu", mirror=False).predict(study)
    assert any("trained on 2-D grey-level images" in w for w in result.warnings)


# --------------------------------------------------------------------------- properties (hypothesis)


_VOLUMES = st.builds(
    lambda n, h, w, sp, lo, hi, seed: (np.random.default_rng(seed).uniform(lo, lo + hi, (n, h, w)).astype(np.float32),
                                       sp),
    st.integers(1, 6), st.integers(4, 48), st.integers(4, 48),
    st.tuples(st.floats(0.1, 20.0), st.floats(0.2, 8.0), st.floats(0.2, 8.0)),
    st.floats(-3000.0, 2000.0), st.floats(0.0, 3000.0), st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_VOLUMES)
def test_gate_answers_any_volume_with_stats_or_a_clear_refusal(case):
    """Whatever the volume: stats whose checks are JSON values, or MsnetError; the mirror image alike."""
    hu, sp = case
    for arr in (hu, np.ascontiguousarray(hu[:, :, ::-1])):
        vol = CTVolume(arr, sp, -np.arange(len(arr)) * sp[0], "fuzz", "memory")
        ok, stats = _verdict(vol)
        json.dumps(stats.checks, allow_nan=False)
        assert ok is False  # noise is never a chest CT


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lo=st.floats(-1100.0, -850.0), hi=st.floats(0.0, 1500.0), n=st.integers(10, 40),
       sz=st.floats(0.5, 8.0), ps=st.floats(0.4, 1.2), flip=st.booleans(), turn=st.integers(0, 3),
       crop=st.tuples(st.floats(0.0, 0.2), st.floats(0.0, 0.2)))
def test_a_photo_in_any_hu_range_is_never_a_chest_ct(lo, hi, n, sz, ps, flip, turn, crop):
    img = np.rot90(_cat_hu(lo, hi), turn)
    a, b = int(crop[0] * img.shape[0]), int(crop[1] * img.shape[1])
    img = img[a:, b:][:, ::-1] if flip else img[a:, b:]
    vol = CTVolume(np.repeat(np.ascontiguousarray(img)[None], n, 0), (sz, ps, ps), -np.arange(n) * sz, "cat", "memory")
    assert _verdict(vol)[0] is False


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(start=st.floats(0.0, 0.6), length=st.floats(0.3, 1.0), flip=st.booleans())
def test_any_slab_of_a_real_scan_with_enough_lung_passes(scans, start, length, flip):
    """Any contiguous part of a real chest CT that holds 1 l of lung or more passes, mirrored or not, and the
    coarse grid and the fine one agree."""
    vol = scans["normal001"]
    a = int(start * vol.n_slices)
    b = min(vol.n_slices, a + max(20, int(length * vol.n_slices)))
    hu = vol.hu[a:b, :, ::-1] if flip else vol.hu[a:b]
    part = CTVolume(np.ascontiguousarray(hu), vol.spacing_mm, vol.z_mm[a:b], "part", vol.source)
    fine_ok, fine = _verdict(part, coarse=False)
    if fine.volume_ml >= 1000.0:
        assert fine_ok, G.failed(fine.checks)
    assert _verdict(part)[0] == fine_ok
