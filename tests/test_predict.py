"""Bundle, `msnet predict` (JSON, CSV, zip input, bad studies) and explanations."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from msnet.cli import app


def _cohort(bundle: Path):
    from msnet.data.cohorts import read_cohort, read_slice_labels

    data = bundle.parent.parent / "data"
    return read_cohort(data / "cohort.csv"), read_slice_labels(data / "slice_labels.csv")


def test_bundle_holds_everything_predict_needs(tiny_bundle, tmp_path):
    from msnet.inference.predictor import Predictor

    card = json.loads((tiny_bundle / "metadata.json").read_text())
    assert card["classes"] == ["COVID-19", "CAP", "NORMAL"]
    assert "not" in card["intended_use"].lower() and "diagnos" in card["intended_use"].lower()
    assert card["input"]["windows_hu"] == [{"level": -600.0, "width": 1500.0}]
    assert "accuracy" in card["metrics"]["patient_level_test"]
    # a copy far from the run folder still predicts: the bundle needs nothing else
    moved = tmp_path / "moved"
    shutil.copytree(tiny_bundle, moved)
    rows, _ = _cohort(tiny_bundle)
    result = Predictor(moved, device="cpu").predict(rows[0]["path"]).to_dict()
    assert set(result) >= {"study_id", "prediction", "probabilities", "n_slices", "key_slices", "timing_s", "warnings"}
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-4
    assert set(result["timing_s"]) == {"read", "preprocess", "backbone", "aggregate", "total"}


def test_predict_cli_json_csv_zip_and_bad_study(tiny_bundle, tmp_path):
    rows, _ = _cohort(tiny_bundle)
    study = Path(rows[0]["path"])
    archive = tmp_path / f"{study.name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(study.rglob("*")):
            zf.write(f, f"{study.name}/{f.relative_to(study)}")
    bad = tmp_path / "not-a-study"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), str(study), str(archive), str(bad), "--json", "--out", str(out)])
    assert res.exit_code == 1  # one bad study: reported, skipped, non-zero exit at the end
    printed = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    lines = [x for x in printed if "prediction" in x]
    assert len(lines) == 2 and [x["study_id"] for x in printed if x.get("status") == "failed"] == ["not-a-study"]
    assert lines[0]["prediction"] == lines[1]["prediction"]
    np.testing.assert_allclose(list(lines[0]["probabilities"].values()), list(lines[1]["probabilities"].values()), atol=1e-6)
    with open(out / "status.csv") as fh:
        status = list(csv.DictReader(fh))
    assert [s["status"] for s in status] == ["ok", "ok", "failed"]
    assert "not-a-study" in status[2]["error"]
    with open(out / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_key_slices_find_lesions_and_explain_writes_pngs(tiny_bundle, tmp_path):
    """Top key slices of diseased studies fall on lesion slices far more often than chance (the phantoms
    also carry nodules and atelectasis on slices without pneumonia, which a small model at 112 px can
    mistake for small ground-glass foci)."""
    from PIL import Image

    from msnet.inference.predictor import Predictor

    rows, labels = _cohort(tiny_bundle)
    predictor = Predictor(tiny_bundle, device="cpu")
    hits, base, k = [], [], 3
    for r in rows:
        if r["label"] == "NORMAL" or r["subset"] != "test":  # held-out diseased patients
            continue
        lab = labels[r["patient_id"]]
        res = predictor.predict(r["path"], study_id=r["patient_id"]).to_dict()
        top = [s["slice_index"] for s in res["key_slices"][:k]]
        hits += [bool(lab[i]) for i in top]
        base.append(lab.mean())
    precision, chance = float(np.mean(hits)), float(np.mean(base))
    assert precision >= min(0.95, chance + 0.2), (precision, chance)

    r = next(r for r in rows if r["label"] != "NORMAL")
    res = predictor.predict(r["path"], study_id=r["patient_id"], explain_dir=tmp_path / "explain", top_k=4).to_dict()
    strip = Image.open(res["explanation"]["key_slices_png"])
    curve = Image.open(res["explanation"]["slice_scores_png"])
    assert strip.size[0] > 3 * strip.size[1] and curve.size[0] > 200
    assert len(np.unique(np.asarray(strip.convert("RGB"))[..., 0])) > 50  # a real picture, not a blank


def test_reading_ahead_gives_the_same_results_in_the_same_order(tiny_bundle, tmp_path):
    """predict_many reads the next study while the model works (the GPU default): same predictions,
    same order, a bad study in the middle still recorded where it was, finished studies skipped."""
    from msnet.inference.batch import predict_many
    from msnet.inference.predictor import Predictor

    rows, _ = _cohort(tiny_bundle)
    bad = tmp_path / "not-a-study"
    bad.mkdir()
    (bad / "notes.txt").write_text("hello")
    studies = [rows[0]["path"], str(bad), rows[1]["path"], rows[2]["path"]]
    predictor = Predictor(tiny_bundle, device="cpu")
    plain, plain_status = predict_many(predictor, studies, prefetch=0)
    ahead, ahead_status = predict_many(predictor, studies, out=tmp_path / "out", prefetch=2)
    assert [s["status"] for s in ahead_status] == [s["status"] for s in plain_status] == ["ok", "failed", "ok", "ok"]
    assert [r["study_id"] for r in ahead] == [r["study_id"] for r in plain]
    assert [r["probabilities"] for r in ahead] == [r["probabilities"] for r in plain]
    again, again_status = predict_many(predictor, studies, out=tmp_path / "out", prefetch=1)  # resumed: nothing redone
    assert [r["study_id"] for r in again] == [r["study_id"] for r in plain]
    assert [s["status"] for s in again_status] == ["ok", "failed", "ok", "ok"]
    # reader processes (read + checks + lung gate ahead, HU back through shared memory): the same answers
    shm = set(Path("/dev/shm").glob("msnet-study-*"))
    procs, procs_status = predict_many(predictor, studies, readers=2)
    assert [s["status"] for s in procs_status] == ["ok", "failed", "ok", "ok"]
    assert "not-a-study" in procs_status[1]["error"] and "no DICOM" in procs_status[1]["error"]
    assert [r["probabilities"] for r in procs] == [r["probabilities"] for r in plain]
    assert [r["warnings"] for r in procs] == [r["warnings"] for r in plain]
    assert set(Path("/dev/shm").glob("msnet-study-*")) == shm  # no file left behind


def test_key_slices_are_spread_along_z(tiny_bundle, shared_data):
    """On a real 2 mm scan, no two key slices lie closer than the minimum gap; the first is the top-scoring
    slice; without the gap the same scores would give neighbouring slices."""
    from conftest import P001

    from msnet.inference.predictor import Predictor, pick_key_slices

    pred = Predictor(tiny_bundle, device="cpu", key_slice_gap_mm=10.0).predict(P001)
    vol = pred.extra["volume"]
    keys = [k["slice_index"] for k in pred.key_slices]
    z = np.asarray(vol.z_mm, float)
    assert len(keys) >= 2 and keys[0] == int(np.argmax(pred.slice_scores))
    assert min(abs(z[a] - z[b]) for i, a in enumerate(keys) for b in keys[i + 1 :]) >= 10.0 - 1e-6
    crowded = pick_key_slices(np.asarray(pred.slice_scores), len(keys), z, min_gap_mm=0)
    assert min(abs(int(a) - int(b)) for i, a in enumerate(crowded) for b in crowded[i + 1 :]) < 5  # 10 mm = 5 slices


def test_grad_cam_is_one_scale_for_the_study_and_stays_in_the_lungs(tiny_bundle, shared_data, tmp_path):
    """On a real scan: the maps of the key slices and of the weakest slice share one scale (the weakest
    slice's map is near zero), and their mass lies inside the lungs, judged by a threshold mask made here."""
    from conftest import P001
    from scipy import ndimage

    from msnet.inference.explain import study_cam, study_scale, weighted_cam
    from msnet.inference.predictor import Predictor

    predictor = Predictor(tiny_bundle, device="cpu")
    pred = predictor.predict(P001, explain_dir=tmp_path / "explain")
    vol, feats = pred.extra["volume"], pred.extra["features"]
    target = predictor.classes.index(pred.prediction)
    scores = np.asarray(pred.slice_scores)
    spacing = (float(vol.spacing_mm[1]), float(vol.spacing_mm[2]))

    def weighted(i: int) -> np.ndarray:
        return weighted_cam(predictor, vol.hu[i], vol.kind, feats, i, target, float(scores[i]), spacing)

    keys = [k["slice_index"] for k in pred.key_slices]
    maps = {i: weighted(i) for i in keys}
    scale = study_scale(list(maps.values()))
    assert pred.explanation["cam_scale"] == scale  # the strip used the same scale
    weakest = int(np.argmin(np.where(scores > 0, scores, np.inf))) if (scores > 0).any() else 0
    low = study_cam(weighted(weakest), scale)
    assert low.max() <= max(0.05, 1.5 * scores[weakest]), (low.max(), scores[weakest])
    size = predictor.spec.size
    shown = [i for i in keys if study_cam(maps[i], scale).max() > 0.05]  # weaker key slices fade, as they should
    assert shown and max(study_cam(maps[i], scale).max() for i in keys) == 1.0
    for i in shown:
        cam = study_cam(maps[i], scale)
        hu = np.asarray(vol.hu[i])
        body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -500, iterations=3))
        lungs = ndimage.binary_dilation(body & (hu < -400) & ~ndimage.binary_dilation(~body, iterations=8),
                                        iterations=10)  # aerated tissue inside the body, with a 10 px margin
        small = np.asarray(ndimage.zoom(lungs.astype(np.float32), size / hu.shape[0], order=1)) > 0.5
        assert (cam * small).sum() / cam.sum() > 0.9, i
    strip = np.asarray(Image.open(pred.explanation["key_slices_png"]).convert("RGB"))
    assert strip.shape[1] > 3 * strip.shape[0]
