"""Features from mid-level stage statistics (``backbone.pool_stages``): what the cut network computes,
that it survives the checkpoint, ONNX and Grad-CAM, and the probe that standardises each feature."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from msnet import preprocess as P
from msnet.errors import MsnetError
from msnet.inference.bundle import load_backbone, save_backbone
from msnet.models.backbones import create


def _ucsd_images(shared_data: Path, n: int = 4) -> torch.Tensor:
    """Real UCSD COVID-CT slice images, grey replicated to three channels, Lite0's normalisation."""
    files = sorted((shared_data / "ucsd-covid-ct" / "train" / "CT_COVID").glob("*.png"))[:n]
    assert len(files) == n
    grey = [np.asarray(Image.open(f).convert("L").resize((224, 224), Image.BILINEAR), np.float32) / 255 for f in files]
    x = torch.from_numpy(np.stack(grey))[:, None].repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5


def test_features_are_channel_means_and_sds_of_the_stages_of_the_uncut_network(shared_data):
    x = _ucsd_images(shared_data)
    full = create("efficientnet_lite0", pretrained=True).eval()
    seen = {}
    for k in (3, 4):  # stages 4 and 5 are blocks.3 and blocks.4
        full.model.blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
    with torch.no_grad():
        full.model(x)
        cut = create("efficientnet_lite0", pretrained=True, pool_stages=[5, 4]).eval()
        feats = cut(x)
    expected = torch.cat([torch.cat([seen[k].mean((2, 3)), seen[k].std((2, 3), unbiased=False)], 1) for k in (3, 4)], 1)
    assert cut.num_features == 2 * (80 + 112) == feats.shape[1]
    torch.testing.assert_close(feats, expected, atol=1e-3, rtol=1e-4)
    # making the cut network must not have moved the ImageNet batch-norm statistics
    uncut = full.model.state_dict()
    assert all(torch.equal(v, uncut[k]) for k, v in cut.model.state_dict().items())
    assert len(cut.model.state_dict()) < len(uncut)  # blocks.5 onwards are gone


def test_bad_pool_stages_are_refused():
    with pytest.raises(MsnetError, match="pool_stages"):
        create("efficientnet_lite0", pool_stages=[9])
    bb = create("resnet18", pool_stages=[2, 3])  # any backbone: stage paths, not Lite0 internals
    assert bb(torch.zeros(1, 3, 64, 64)).shape == (1, 2 * (128 + 256))  # layer2, layer3


def test_checkpoint_onnx_and_freezing_keep_the_cut(shared_data, tmp_path):
    import onnxruntime as ort

    from msnet.inference.onnx import export_backbone

    x = _ucsd_images(shared_data, 3)
    bb = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5], freeze=3).eval()
    assert sum(p.requires_grad for p in bb.stages[2][0].parameters()) == 0
    assert all(p.requires_grad for p in bb.stages[5][0].parameters())
    spec = P.PreprocessSpec(kind="grey", windows=((-600.0, 1500.0),), size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_backbone(tmp_path / "backbone.pt", bb, spec, ["COVID-19", "NON-COVID"])
    back, _, _, meta = load_backbone(tmp_path / "backbone.pt")
    assert meta["pool_stages"] == [4, 5] and back.num_features == bb.num_features
    with torch.no_grad():
        ref = bb(x)
        torch.testing.assert_close(back(x), ref)
    path = export_backbone(bb, 224, tmp_path / "backbone.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-3, rtol=1e-3)


def test_grad_cam_runs_on_a_cut_backbone(shared_data):
    from msnet.inference.explain import grad_cam

    bb = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5]).eval()
    head = torch.nn.Linear(bb.num_features, 2)
    spec = P.PreprocessSpec(kind="grey", windows=((-600.0, 1500.0),), size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    predictor = SimpleNamespace(spec=spec, bundle=SimpleNamespace(backbone=bb), head=head, device=torch.device("cpu"))
    unit = (_ucsd_images(shared_data, 1)[0] * 0.5 + 0.5)
    cam = grad_cam(predictor, unit, torch.zeros(1, bb.num_features), 0, 0)
    assert cam.shape == (224, 224) and np.isfinite(cam).all() and cam.max() <= 1.0


def test_feature_scaled_probe_ignores_the_units_of_a_feature():
    """The per-feature probe gives the same decisions when one feature's unit changes by 10^4;
    the overall-scaled probe does not (that feature swamps the shared standard deviation)."""
    from msnet.config import Config
    from msnet.data import slices as S
    from msnet.stages import slice_model as M

    g = torch.Generator().manual_seed(0)
    n = 120
    y = torch.arange(n) % 2
    informative = y[:, None].double() * 1.5 + torch.randn(n, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 5, generator=g, dtype=torch.float64)

    class Fixed(torch.nn.Module):  # a "backbone" that returns given features
        def __init__(self, feats):
            super().__init__()
            self.feats, self.data_config = feats.float(), {"mean": (0.0,) * 3, "std": (1.0,) * 3}

        def forward(self, x):  # the image of slice i holds i / 255
            return self.feats[(x[:, 0, 0, 0] * 255).round().long()]

    class Slices(SimpleNamespace):
        def __init__(self, images, labels):
            super().__init__(images=images, labels=labels)

        def __len__(self):
            return len(self.labels)

    def decisions(feats, scale):
        cfg = Config()
        cfg.finetune.probe_scale, cfg.finetune.probe_c, cfg.finetune.class_weights = scale, 1.0, False
        model = SimpleNamespace(backbone=Fixed(feats), fc=torch.nn.Linear(feats.shape[1], 2))
        data = Slices(torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2), y)
        M.fit_linear_probe(model, data, cfg.finetune, torch.device("cpu"))
        with torch.no_grad():
            return model.fc(feats.float()).argmax(1)

    base = torch.cat([informative, noise], 1)
    scaled = base.clone()
    scaled[:, 3] *= 1e4  # a noise feature in other units
    assert torch.equal(decisions(base, "feature"), decisions(scaled, "feature"))
    assert (decisions(base, "feature") == y).float().mean() > 0.75
    assert (decisions(scaled, "overall") == y).float().mean() < (decisions(base, "feature") == y).float().mean()
    with pytest.raises(MsnetError, match="probe_scale"):
        decisions(base, "per-feature")


def test_shipped_ucsd_recipe_on_real_images(shared_data, tmp_path, monkeypatch):
    """The shipped `ucsd` config end to end on a sample of the real images: the model it saves is the
    frozen Lite0 cut after blocks 3-4 with a probe on their first- and second-order statistics over the
    image and inside its lungs, and it reads held-out images."""
    import json
    import shutil

    from msnet.config import load_config
    from msnet.data.cohorts import index_dataset
    from msnet.stages.finetune import finetune
    from msnet.stages.slice_model import load_slice_classifier

    src = shared_data / "ucsd-covid-ct"
    root = tmp_path / "data"
    for split, n in (("train", 90), ("val", 29)):
        for cls in ("CT_COVID", "CT_NonCOVID"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).iterdir())[::2][:n]:
                shutil.copy(f, root / split / cls / f.name)
    shutil.copytree(src / "meta", root / "meta")
    monkeypatch.chdir(tmp_path)
    index_dataset(root, tmp_path / "ucsd")
    cfg = load_config("ucsd", ["finetune.folds=3"])  # 3 folds, not 5: the same path in less time
    result = finetune(cfg, test_dir=root / "val")  # the temperature needs the out-of-fold predictions: CV first
    cv = json.loads((cfg.run_path / "finetune" / "cv" / "cv_metrics.json").read_text())
    assert cv["k"] == 3 and result["temperature"] == cv["oof_temperature"]
    model = load_slice_classifier(cfg.run_path / "finetune" / "backbone.pt")
    assert model.backbone.pool_stages == (4, 5) and model.backbone.pool_lungs and model.backbone.pool_covariance
    assert model.fc.in_features == 2 * (80 + 80 * 81 // 2 + 112 + 112 * 113 // 2) == 19520
    assert model.spec.lung_crop
    assert result["best_epoch"] == 0  # a probe: nothing fine-tuned
    test = json.loads((cfg.run_path / "finetune" / "test" / "val" / "metrics.json").read_text())
    assert test["n"] == 58 and test["accuracy"] >= 0.58 and test["auc"] >= 0.65  # chance: 0.5


@pytest.mark.parametrize("pool_stages,lungs", [([4, 5], True), ([], False)])
def test_slice_classifier_answers_alike_in_either_memory_layout(shared_data, pool_stages, lungs):
    """Stage 1 runs the slice classifier channels last (faster convolutions on a CPU): on real images,
    its probe and its answers match the contiguous layout's."""
    from msnet.config import load_config
    from msnet.data import slices as S
    from msnet.stages import slice_model as M

    cfg = load_config("ucsd", [f"backbone.pool_stages={pool_stages}", f"backbone.pool_lungs={str(lungs).lower()}",
                               f"backbone.pool_covariance={str(lungs).lower()}", "finetune.tta=false"])
    x = _ucsd_images(shared_data, 8)
    data = S.SliceSet(((x[:, :1] * 0.5 + 0.5) * 255).round().to(torch.uint8), torch.tensor([0, 1] * 4))
    torch.manual_seed(0)
    ref = M.model_for(cfg, 2).eval()  # as built: contiguous weights, fed contiguous batches below
    M.fit_linear_probe(ref, data, cfg.finetune, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.softmax(ref(P.finish(P.dequantize(data.images), (0.5,) * 3, (0.5,) * 3)), 1).numpy()
    torch.manual_seed(0)
    fast = M.model_for(cfg, 2).to(memory_format=torch.channels_last)
    M.fit_linear_probe(fast, data, cfg.finetune, torch.device("cpu"))
    assert fast.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.fc.weight, ref.fc.weight, atol=1e-4, rtol=1e-3)
    got = M.predict_slices(fast, data, torch.device("cpu"), cfg.finetune.tta)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()


# --------------------------------------------------------------------------- inside the lungs too


def test_lung_pooling_adds_statistics_that_ignore_what_lies_outside_the_lungs(shared_data, tmp_path):
    """``pool_lungs``: the whole-image statistics, then the same inside each image's 2-D lung mask.
    A label painted on the body wall outside the lungs moves the first half and hardly the second."""
    x = _ucsd_images(shared_data, 4)
    plain = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5]).eval()
    both = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5], pool_lungs=True).eval()
    d = plain.num_features
    assert both.num_features == 2 * d == 768
    weights = both.lung_weights(x)
    unit = (x[:, 0] * 0.5 + 0.5).numpy()
    for w, u in zip(weights[:, 0].numpy(), unit):  # the masks lie on the dark lung fields
        assert 0.2 < w.mean() < 0.8 and u[w > 0].mean() < u[w == 0].mean() - 0.1
    with torch.no_grad():
        f = both(x)
        torch.testing.assert_close(f[:, :d], plain(x))
        assert not torch.allclose(f[:, d:], f[:, :d], atol=1e-2)
        marked = x.clone()
        for i, w in enumerate(weights[:, 0]):  # a white 24 x 24 label where the mask is not, far from it
            rows, cols = np.nonzero(torch.nn.functional.max_pool2d(w[None, None], 65, 1, 32)[0, 0].numpy() == 0)
            r, c = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
            marked[i, :, max(0, r - 12):r + 12, max(0, c - 12):c + 12] = 1.0
        g = both(marked)
    torch.testing.assert_close(both.lung_weights(marked), weights)
    outside = (g[:, :d] - f[:, :d]).norm(dim=1) / f[:, :d].norm(dim=1)
    inside = (g[:, d:] - f[:, d:]).norm(dim=1) / f[:, d:].norm(dim=1)
    assert (outside > 0.005).all() and (inside < 0.5 * outside).all()
    # the checkpoint keeps it
    spec = P.PreprocessSpec(kind="grey", size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_backbone(tmp_path / "b.pt", both, spec)
    again, _, _, _ = load_backbone(tmp_path / "b.pt")
    assert again.pool_lungs and again.num_features == 768
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), f)
    with pytest.raises(MsnetError, match="pool_stages"):
        create("efficientnet_lite0", pool_lungs=True)
    # as ONNX the lung weights are a second input, made outside the graph by the same segmentation:
    # the features match torch's, the label still leaves the lung half alone
    from msnet.inference.encoder import SliceEncoder

    enc = SliceEncoder(spec, both).to_onnx(tmp_path / "onnx")
    assert [i.name for i in enc._session.get_inputs()] == ["images", "lung_weights"]
    np.testing.assert_allclose(enc.embed(x).numpy(), f.numpy(), rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(enc.embed(marked)[:, d:].numpy(), g[:, d:].numpy(), rtol=1e-3, atol=2e-3)
    int8 = SliceEncoder(spec, both).to_onnx(tmp_path / "int8", int8=True, calibration=x.numpy())  # both inputs calibrated
    assert torch.nn.functional.cosine_similarity(int8.embed(x), f, dim=1).min() > 0.98


def test_covariance_pooling_is_the_weighted_channel_covariance_of_each_map(shared_data, tmp_path):
    """``pool_covariance``: each map's channel means, then its channel covariance (entries on and above
    the diagonal, signed square roots) over the whole image and inside the lungs, checked against
    numpy's weighted covariance; its diagonal is the standard deviation the plain backbone gives."""
    x = _ucsd_images(shared_data, 3)
    plain = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5], pool_lungs=True).eval()
    cov = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5], pool_lungs=True,
                 pool_covariance=True).eval()
    with torch.no_grad():
        maps = [m.double().numpy() for m in cov.forward_maps(x)]
        f, g = cov(x).double().numpy(), plain(x).double().numpy()
        lungs = cov.lung_weights(x)
    assert f.shape == (3, cov.num_features)
    at, at_plain = 0, 0
    for weights in (None, lungs):
        for m in maps:
            c = m.shape[1]
            rows, cols = np.triu_indices(c)
            for i in range(len(x)):
                flat = m[i].reshape(c, -1)
                w = None if weights is None else torch.nn.functional.adaptive_avg_pool2d(
                    weights[i:i + 1], m.shape[-2:]).double().numpy().ravel()
                mean = np.average(flat, axis=1, weights=w)
                expected = np.cov(flat, aweights=w, bias=True)[rows, cols]
                np.testing.assert_allclose(f[i, at:at + c], mean, rtol=1e-4, atol=1e-5)
                got = f[i, at + c:at + c + len(rows)]
                np.testing.assert_allclose(np.sign(got) * got**2, expected, rtol=1e-3, atol=1e-5)
                np.testing.assert_allclose(got[rows == cols], g[i, at_plain + c:at_plain + 2 * c], rtol=1e-3, atol=1e-4)
            at += c + len(rows)
            at_plain += 2 * c
    assert at == cov.num_features
    spec = P.PreprocessSpec(kind="grey", size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_backbone(tmp_path / "b.pt", cov, spec)
    again, _, _, meta = load_backbone(tmp_path / "b.pt")
    assert again.pool_covariance and meta["pool_covariance"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x).double().numpy(), f, rtol=1e-5, atol=1e-5)
    with pytest.raises(MsnetError, match="pool_stages"):
        create("efficientnet_lite0", pool_covariance=True)
    # without the lungs it runs as ONNX too
    import onnxruntime as ort

    from msnet.inference.onnx import export_backbone

    whole = create("efficientnet_lite0", pretrained=True, pool_stages=[4, 5], pool_covariance=True).eval()
    export_backbone(whole, 224, tmp_path / "cov.onnx")
    session = ort.InferenceSession(str(tmp_path / "cov.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, whole(x).numpy(), atol=1e-2, rtol=1e-3)
