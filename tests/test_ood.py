"""The out-of-distribution score: a bundle describes its training features, every prediction reports its
score and percentile, a study unlike the training data is warned about (refused with --strict)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NORMAL001

from msnet.inference.ood import FeatureDescription

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "prediction.schema.json").read_text())


def _studies(rng, n: int, shift: float = 0.0, d: int = 32) -> dict[str, np.ndarray]:
    """Slice features of n studies: a shared low-dimensional structure plus noise (as backbone features are)."""
    mix = np.random.default_rng(7).normal(size=(6, d))
    return {f"s{i}": (rng.normal(size=(int(rng.integers(10, 30)), 6)) @ mix + 0.3 * rng.normal(size=(1, d))
                      + shift + 0.2 * rng.normal(size=(1, d))).astype(np.float32) for i in range(n)}


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_description_separates_new_studies_from_others(method):
    rng = np.random.default_rng(0)
    desc = FeatureDescription.fit(_studies(rng, 20), method=method, dims=16)
    held_out = [desc.score(f) for f in _studies(rng, 10).values()]
    other = [desc.score(f) for f in _studies(rng, 10, shift=3.0).values()]
    assert max(held_out) < min(other)
    assert sum(s > desc.threshold for s in held_out) <= 1 and all(s > desc.threshold for s in other)
    assert desc.percentile(min(other)) == 100.0 and desc.percentile(0.0) == 0.0
    assert len(desc.train_scores) == 20 and desc.threshold > np.quantile(desc.train_scores, 0.99)


def test_description_survives_a_weights_only_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    desc = FeatureDescription.fit(_studies(rng, 6), dims=8)
    torch.save(desc.to_state(), tmp_path / "ood.pt")
    back = FeatureDescription.from_state(torch.load(tmp_path / "ood.pt", weights_only=True))
    probe = rng.normal(size=(12, 32)).astype(np.float32)
    assert back.score(probe) == desc.score(probe) and back.threshold == desc.threshold
    assert back.summary() == desc.summary()


# --------------------------------------------------------------------------- in a bundle, in every prediction


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A bundle (the backbone's ImageNet weights) whose description is fitted, as `msnet bundle` fits it, on
    the features of phantom studies (RUN/features: manifest.csv + <study>.npy); the studies."""
    from test_gates import _bundle

    from msnet.data.synthetic import synth_cohort
    from msnet.inference import bundle as B
    from msnet.inference.predictor import Predictor
    from msnet.io import read_study

    root = tmp_path_factory.mktemp("ood")
    synth_cohort(root / "data", 8, size=64, seed=4, slices=(8, 12))
    studies = sorted(p for p in (root / "data").iterdir() if p.is_dir())
    plain = Predictor(_bundle(root / "plain", "hu", pretrained=True), device="cpu", mirror=False)
    fdir = root / "features"
    fdir.mkdir()
    with open(fdir / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["patient_id", "label", "subset", "path", "file", "status", "error"])
        w.writeheader()
        for i, s in enumerate(studies):
            np.save(fdir / f"{s.name}.npy", plain.features(read_study(s).hu).numpy())
            w.writerow({"patient_id": s.name, "label": "NORMAL", "subset": "test" if i == 0 else "train",
                        "path": str(s), "file": f"{s.name}.npy", "status": "ok", "error": ""})
    desc = B.describe_training_features(fdir)
    assert desc is not None and desc.n_studies == len(studies) - 1  # the test study is not described
    return _bundle(root / "bundle", "hu", ood=desc, pretrained=True), studies


def test_every_prediction_reports_its_ood_score(phantom_run):
    import jsonschema

    from msnet.inference import bundle as B
    from msnet.inference.predictor import Predictor

    bundle, studies = phantom_run
    assert (bundle / B.OOD).is_file() and json.loads((bundle / B.CARD).read_text())["ood"]["n_studies"] == 7
    p = Predictor(bundle, device="cpu", mirror=False)
    r = p.predict(studies[1])  # held in
    d = r.to_dict()
    jsonschema.validate(d, SCHEMA)
    assert d["ood_score"] <= p.bundle.ood.threshold and 0.0 <= d["ood_percentile"] <= 100.0
    assert not any("out of distribution" in w for w in r.warnings)


def test_real_ct_is_out_of_distribution_for_a_phantom_model(phantom_run, shared_data, tmp_path):
    """A real scan passes every gate but is unlike the phantoms the model knows: a warning with its score,
    and with --strict a refusal (exit 1)."""
    from typer.testing import CliRunner

    from msnet.cli import app
    from msnet.errors import MsnetError
    from msnet.inference.predictor import Predictor

    from msnet.io import read_study

    bundle, _ = phantom_run
    vol = read_study(NORMAL001)
    p = Predictor(bundle, device="cpu", mirror=False)
    r = p.predict_volume(vol)
    assert r.ood_score > p.bundle.ood.threshold and r.ood_percentile == 100.0
    assert any("out of distribution" in w for w in r.warnings)
    with pytest.raises(MsnetError, match="--strict"):
        Predictor(bundle, device="cpu", mirror=False, strict=True).predict_volume(vol)
    res = CliRunner().invoke(app, ["predict", str(bundle), str(NORMAL001), "--json", "--strict"])
    assert res.exit_code == 1 and "out of distribution" in res.output
