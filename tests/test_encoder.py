"""One path from slices to features: the features MS-Net is trained on are the ones it is served,
and a bundle is one schema, checked when it is read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from msnet.cli import app
from msnet.data.cohorts import read_cohort
from msnet.errors import MsnetError
from msnet.inference import bundle as B
from msnet.inference.batch import predict_many
from msnet.inference.predictor import Predictor
from msnet.io import read_study
from msnet.preprocess import PreprocessSpec

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "prediction.schema.json").read_text())


def _rows(bundle: Path) -> list[dict]:
    return read_cohort(bundle.parent.parent / "data" / "cohort.csv")


def _validate(obj: dict) -> None:
    import jsonschema

    jsonschema.validate(obj, SCHEMA)
    assert abs(sum(obj["probabilities"].values()) - 1) < 1e-4
    assert len(obj["slice_scores"]) == obj["n_slices"]


def test_served_features_equal_extracted_features(tiny_bundle) -> None:
    """Parity (CPU): Predictor's features of a study == the features `msnet extract` cached for it."""
    run = tiny_bundle.parent
    set_id = json.loads((run / "features" / "latest.json").read_text())["set_id"]
    fdir = run / "features" / set_id
    meta = json.loads((fdir / "meta.json").read_text())
    predictor = Predictor(tiny_bundle, device="cpu")
    assert meta["preprocess"] == predictor.spec.to_dict()
    rows = _rows(tiny_bundle)
    for r in (rows[0], rows[-1]):
        cached = np.load(fdir / f"{r['patient_id']}.npy")
        served = predictor.predict(r["path"], study_id=r["patient_id"]).extra["features"].numpy()
        assert served.shape == cached.shape
        assert np.abs(served - cached).max() <= 1e-5


def test_aggregator_runs_once_and_volume_is_not_changed(tiny_bundle) -> None:
    predictor = Predictor(tiny_bundle, device="cpu", mirror=False)  # one view (mirror averaging: one per view)
    agg, calls = predictor.aggregator, []
    real_temporal = agg.temporal
    agg.temporal = lambda *a, **k: (calls.append("temporal"), real_temporal(*a, **k))[1]
    vol = read_study(_rows(tiny_bundle)[0]["path"])
    before = list(vol.warnings)  # the bundle's own warning (trained on phantoms) goes in the prediction only
    try:
        pred = predictor.predict_volume(vol)
    finally:
        del agg.temporal
    assert calls == ["temporal"]  # the dilated stack ran once for logits and key-slice scores together
    assert vol.warnings == before and any("synthetic phantoms" in w for w in pred.warnings)
    # the single pass gives the same answer as separate forward and slice_scores passes
    feats = pred.extra["features"][None]
    with torch.no_grad():
        probs = torch.softmax(predictor.aggregator(feats) / predictor.bundle.temperature, dim=1)[0].numpy()
    scores = predictor.aggregator.slice_scores(feats)[0].numpy()
    assert np.allclose([pred.probabilities[c] for c in predictor.classes], probs, atol=1e-5)
    assert [k["slice_index"] for k in pred.key_slices][0] == int(scores.argmax())


def test_cli_and_batch_outputs_follow_one_schema(tiny_bundle, tmp_path) -> None:
    rows = _rows(tiny_bundle)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), str(rows[0]["path"]), str(rows[1]["path"]), "--json",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    for obj in lines:
        _validate(obj)
    for line in (out / "predictions.jsonl").read_text().splitlines():
        _validate(json.loads(line)["prediction"])
    csv_rows = (out / "predictions.csv").read_text().splitlines()
    assert csv_rows[0].startswith("study_id,prediction,p_COVID-19,p_CAP,p_NORMAL") and len(csv_rows) == 3


def test_batch_keeps_finished_studies_and_resumes(tiny_bundle, tmp_path) -> None:
    """An interrupted batch keeps what finished; a re-run predicts only the rest."""
    rows = _rows(tiny_bundle)[:3]
    predictor = Predictor(tiny_bundle, device="cpu")
    seen: list[str] = []
    real = predictor.predict  # one study at a time on the CPU: each read inside predict (streamed)

    def interrupting(study, **kw):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(str(study))
        return real(study, **kw)

    predictor.predict = interrupting
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_many(predictor, [Path(r["path"]) for r in rows], out=out)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    seen.clear()
    predictor.predict = lambda study, **kw: (seen.append(str(study)), real(study, **kw))[1]
    results, status = predict_many(predictor, [Path(r["path"]) for r in rows], out=out)
    assert seen == [str(Path(rows[2]["path"]))]
    assert [s["status"] for s in status] == ["ok"] * 3 and len(results) == 3


def test_bundle_with_mismatched_halves_is_refused(tiny_bundle, tmp_path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    agg, meta = B.load_aggregator(copy / B.AGGREGATOR)
    other = PreprocessSpec(windows=((40.0, 400.0),), size=meta["preprocess"]["size"],
                           mean=meta["preprocess"]["mean"], std=meta["preprocess"]["std"])
    B.save_aggregator(copy / B.AGGREGATOR, agg, meta["aggregator"], meta["classes"], other)
    with pytest.raises(MsnetError, match="preprocessed as"):
        Predictor(copy, device="cpu")


def test_checkpoint_cannot_run_code(tmp_path) -> None:
    """A checkpoint holding a pickled callable is refused, and the callable never runs."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    code = ("import os, torch\n"
            "class Evil:\n"
            f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'schema': 1, 'x': Evil()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(MsnetError, match="cannot load"):
        B.load_checkpoint(evil)
    assert not marker.exists()


def test_old_or_foreign_checkpoint_names_the_fix(tmp_path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"backbone": "resnet18", "backbone_state_dict": {}}, path)
    with pytest.raises(MsnetError, match="schema") as err:
        B.load_backbone(path)
    assert "rebuild" in str(err.value)


def test_no_lungs_no_diagnosis_and_lung_crop_is_one_path(tiny_bundle) -> None:
    from dataclasses import replace

    from msnet.preprocess import lung_stats, model_slices

    predictor = Predictor(tiny_bundle, device="cpu")
    vol = read_study(_rows(tiny_bundle)[0]["path"])
    body = np.where(vol.hu > -500, vol.hu, 40.0).astype(np.float32)  # the same body with its lungs filled in
    with pytest.raises(MsnetError, match="lung"):
        predictor.predict_volume(replace(vol, hu=body))
    nan = vol.hu.copy()
    nan[0, :4, :4] = np.nan  # a volume made in code, not by read_study: the same sanity checks apply
    with pytest.raises(MsnetError, match="NaN"):
        predictor.predict_volume(replace(vol, hu=nan))
    assert not np.isnan(vol.hu).any()
    # with lung_crop in the spec, training, extraction and serving all crop through model_slices
    spec = PreprocessSpec(lung_crop=True, size=predictor.spec.size)
    cropped = model_slices(vol, spec)
    box = lung_stats(vol.hu, vol.spacing_mm, vol.z_mm).box
    assert cropped.shape[0] == vol.n_slices and cropped.shape[1] < vol.hu.shape[1] and box is not None
    assert model_slices(vol, predictor.spec) is vol.hu  # no crop: the volume as read
