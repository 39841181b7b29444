"""ONNX export of a bundle: parity with PyTorch, the ONNX runtime of Predictor, static int8 agreement."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from msnet.errors import MsnetError
from msnet.inference.encoder import SliceEncoder
from msnet.inference.export import (PARITY_TOL, _volumes, export_bundle, int8_agreement, synthetic_studies)
from msnet.inference.onnx import AGGREGATOR_ONNX, BACKBONE_INT8_ONNX, BACKBONE_ONNX, find_onnx, ort_session
from msnet.inference.predictor import Predictor
from msnet.io import read_study


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
    torch_result = Predictor(bundle, device="cpu", runtime="torch").predict(study).to_dict()
    onnx_result = Predictor(bundle, device="cpu", runtime="onnx").predict(study).to_dict()
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
    q = Predictor(bundle, device="cpu", runtime="onnx", int8=True).predict(study).to_dict()
    assert abs(sum(q["probabilities"].values()) - 1.0) < 1e-4


def test_onnx_aggregator_dynamic_slices(exported) -> None:
    bundle, _ = exported
    ref = Predictor(bundle, device="cpu")
    session = ort_session(find_onnx(bundle).parent / AGGREGATOR_ONNX)
    d = ref.metadata["backbone"]["n_features"]
    for n in (3, 40):
        feats = torch.randn(1, n, d)
        logits = session.run(None, {"features": feats.numpy()})[0]
        with torch.inference_mode():
            expected = ref.aggregator(feats).numpy()
        assert logits.shape == expected.shape == (1, len(ref.classes))
        assert np.abs(logits - expected).max() <= 1e-4


def test_onnx_encoder_batches_and_missing_int8(exported, tiny_bundle, tmp_path) -> None:
    bundle, _ = exported
    spec = Predictor(bundle, device="cpu").spec
    enc = SliceEncoder(spec, runtime="onnx", onnx_model=find_onnx(bundle), batch_size=4)
    assert enc.embed(torch.zeros(1, 3, spec.size, spec.size)).shape[0] == 1
    assert enc.encode(np.full((5, 40, 40), -800.0, np.float32)).shape[0] == 5
    with pytest.raises(MsnetError, match="int8"):
        find_onnx(tiny_bundle, int8=True)
    # export recorded where it wrote: --runtime onnx finds models outside the bundle, and says where it looked
    outside = tmp_path / "elsewhere"
    shutil.copytree(bundle / "onnx", outside)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    shutil.rmtree(copy / "onnx")
    (copy / "onnx.json").write_text(json.dumps({"out": str(outside)}))
    assert find_onnx(copy) == outside / BACKBONE_ONNX
    (copy / "onnx.json").unlink()
    with pytest.raises(MsnetError, match="looked in") as err:
        find_onnx(copy)
    assert str(copy / "onnx") in str(err.value)


def test_int8_agreement_fails_for_a_broken_quantised_model(exported, study, tmp_path) -> None:
    """The agreement check must catch an int8 model that disagrees: scale its weights' quantisation."""
    bundle, _ = exported
    model = onnx.load(str(bundle / "onnx" / BACKBONE_INT8_ONNX))
    broken = 0
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            if arr.ndim == 1 and arr.size > 8:  # per-channel weight scales
                init.CopyFrom(numpy_helper.from_array(arr * np.linspace(0.2, 5.0, arr.size, dtype=np.float32), init.name))
                broken += 1
    assert broken > 0
    path = tmp_path / "broken_int8.onnx"
    onnx.save(model, str(path))
    ref = Predictor(bundle, device="cpu")
    vols = _volumes(synthetic_studies(tmp_path / "s", n=3, size=96, slices=(10, 12), seed=8))
    broken_figures = int8_agreement(ref, path, vols)
    good_figures = int8_agreement(ref, bundle / "onnx" / BACKBONE_INT8_ONNX, vols)
    assert not broken_figures["ok"]
    assert broken_figures["max_prob_diff"] > good_figures["max_prob_diff"]


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
