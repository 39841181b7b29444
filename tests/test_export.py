"""ONNX export of a bundle: parity with PyTorch, the ONNX runtime of Predictor, static int8 agreement."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from msnet.errors import MsnetError  # noqa: E402
from msnet.inference.onnx import (  # noqa: E402
    AGGREGATOR_ONNX, BACKBONE_INT8_ONNX, BACKBONE_ONNX, PARITY_TOL, export_bundle, onnx_aggregator_fn,
    onnx_backbone_fn, synthetic_studies)
from msnet.io import read_study  # noqa: E402
from msnet.inference.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle exported with --int8 (calibrated on its own training cohort)."""
    bundle = tmp_path_factory.mktemp("export") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    result = export_bundle(bundle, int8=True, check_studies=[], n_calibration=32)
    return bundle, result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return synthetic_studies(tmp_path_factory.mktemp("study"), n=1, size=96, slices=(14, 14), seed=3)[0]


def test_export_writes_models_and_parity(exported) -> None:
    bundle, result = exported
    out = bundle / "onnx"
    for name in (BACKBONE_ONNX, AGGREGATOR_ONNX, BACKBONE_INT8_ONNX, "parity.json", "int8_agreement.json"):
        assert (out / name).is_file(), name
    parity = json.loads((out / "parity.json").read_text())
    assert parity["n_studies"] == len(parity["studies"]) == 3
    assert parity["ok"] and parity["all_same_class"]
    assert 0.0 <= parity["max_prob_diff"] <= PARITY_TOL
    assert parity["aggregator_max_logit_diff"] <= 1e-4
    assert result["parity"]["max_prob_diff"] == parity["max_prob_diff"]


def test_onnx_predictor_matches_torch(exported, study) -> None:
    bundle, _ = exported
    torch_result = Predictor(bundle, device="cpu", runtime="torch").predict(study)
    onnx_result = Predictor(bundle, device="cpu", runtime="onnx").predict(study)
    assert onnx_result["prediction"] == torch_result["prediction"]
    a = np.array(list(torch_result["probabilities"].values()))
    b = np.array(list(onnx_result["probabilities"].values()))
    assert np.abs(a - b).max() <= PARITY_TOL
    assert abs(b.sum() - 1.0) < 1e-4
    assert onnx_result["n_slices"] == 14
    assert np.allclose(torch_result["slice_scores"], onnx_result["slice_scores"], atol=1e-3)


def test_int8_agreement_file(exported, study) -> None:
    bundle, result = exported
    agree = json.loads((bundle / "onnx" / "int8_agreement.json").read_text())
    for key in ("n_studies", "all_same_class", "max_prob_diff", "tolerance", "ok", "calibration_slices", "studies"):
        assert key in agree, key
    rows = agree["studies"]
    assert agree["n_studies"] == len(rows) == 3
    assert agree["all_same_class"] == all(r["same_class"] for r in rows)
    assert agree["max_prob_diff"] == pytest.approx(max(r["max_prob_diff"] for r in rows))
    for r in rows:
        assert r["same_class"] == (r["reference"] == r["other"])
        diffs = [abs(r["reference_probabilities"][c] - r["other_probabilities"][c]) for c in r["reference_probabilities"]]
        assert r["max_prob_diff"] == pytest.approx(max(diffs))
    assert agree["ok"] == (agree["all_same_class"] and agree["max_prob_diff"] <= agree["tolerance"])
    assert 0 < agree["calibration_slices"] <= 32
    assert result["int8"]["ok"] == agree["ok"]
    q = Predictor(bundle, device="cpu", runtime="onnx", int8=True).predict(study)
    assert abs(sum(q["probabilities"].values()) - 1.0) < 1e-4


def test_onnx_aggregator_dynamic_slices(exported) -> None:
    bundle, _ = exported
    ref = Predictor(bundle, device="cpu")
    fn = onnx_aggregator_fn(bundle)
    d = ref.metadata["backbone"]["n_features"]
    for n in (3, 40):
        feats = torch.randn(1, n, d)
        logits = fn(feats)
        with torch.inference_mode():
            expected = ref.aggregator(feats).numpy()
        assert logits.shape == expected.shape == (1, len(ref.classes))
        assert np.abs(logits.numpy() - expected).max() <= 1e-4


def test_backbone_fn_batches_and_missing_int8(exported, tiny_bundle) -> None:
    bundle, _ = exported
    fn = onnx_backbone_fn(bundle)
    size = Predictor(bundle, device="cpu").preprocess["size"]
    assert fn(torch.zeros(1, 3, size, size)).shape[0] == 1
    assert fn(torch.zeros(5, 3, size, size)).shape[0] == 5
    with pytest.raises(MsnetError, match="int8"):
        onnx_backbone_fn(tiny_bundle, int8=True)


def test_int8_without_calibration_source_fails(exported, tmp_path) -> None:
    bundle, _ = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["training_data"]["cohort"] = str(tmp_path / "missing.csv")
    (copy / "metadata.json").write_text(json.dumps(meta))
    (copy / "config.yaml").unlink()
    with pytest.raises(MsnetError, match="calibration"):
        export_bundle(copy, int8=True, check_studies=[])


def test_read_study_unchanged_by_export(study) -> None:
    assert read_study(study).n_slices == 14
